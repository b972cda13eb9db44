"""Corpora as Dagster partitions: one dynamic partition per registered corpus.

A corpus is registered when :func:`assets.automation.corpus_sensor` finds it under
``<data_root>/corpora`` (or by hand: ``fc-pipeline corpus add NAME``); every asset of the dataset
chain is partitioned by it, so each corpus is built, checked and backfilled on its own.
"""

import dagster as dg

from fc_pipeline.instance import CORPUS_PARTITIONS

corpus_partitions = dg.DynamicPartitionsDefinition(name=CORPUS_PARTITIONS)
