"""Corpora as Dagster partitions: one dynamic partition per registered corpus.

A corpus is registered when :func:`assets.automation.corpus_sensor` finds it under
``<data_root>/corpora`` (or by hand: ``fc-pipeline corpus add NAME``); every asset of the dataset
chain is partitioned by it, so each corpus is built, checked and backfilled on its own.
"""

import dagster as dg

from .instance import CORPUS_PARTITIONS

corpus_partitions = dg.DynamicPartitionsDefinition(name=CORPUS_PARTITIONS)


def latest_materialization(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, corpus: str
) -> dg.AssetMaterialization | None:
    """The latest materialisation of one corpus partition of an asset (None if it has none)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[corpus]), limit=1
    ).records
    return records[0].asset_materialization if records else None
