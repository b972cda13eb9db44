"""The Dagster code location of fc-pipeline (loaded by ``workspace.yaml`` / ``-m assets``).

Every asset and asset check defined in a module of this package joins ``defs``: the dataset chain
(:mod:`assets.dataset`, partitioned by corpus; checks in :mod:`assets.checks`), training and
evaluation; jobs, sensors and the schedule come from :mod:`assets.automation`, resources from
:func:`assets.resources.default_resources`, the executor from :func:`assets.deployment.executor_from_env`.
"""

import sys

import dagster as dg

from .automation import build_dataset_job, corpus_sensor, nightly_dataset_refresh, train_job, train_on_new_samples
from .deployment import executor_from_env
from .resources import default_resources

_package = sys.modules[__name__]

defs = dg.Definitions(
    assets=dg.load_assets_from_package_module(_package),
    asset_checks=dg.load_asset_checks_from_package_module(_package),
    jobs=[build_dataset_job, train_job],
    sensors=[corpus_sensor, train_on_new_samples],
    schedules=[nightly_dataset_refresh],
    resources=default_resources(),
    # Default: one process per run (model steps are serialised by the `gpu` pool anyway; each model
    # resource loads its model for a step and releases it after). FC_PIPELINE_EXECUTOR=k8s runs
    # each step in its own pod (docs/deploy-k8s.md).
    executor=executor_from_env(),
)
