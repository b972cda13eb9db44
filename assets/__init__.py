"""The Dagster code location of fc-pipeline (loaded by ``workspace.yaml`` / ``-m assets``).

Every asset and asset check defined in a module of this package joins ``defs``: the dataset
chain (:mod:`assets.dataset`, checks in :mod:`assets.checks`) and, when present, training and
evaluation. Resources come from :func:`assets.resources.default_resources`.
"""

import sys

import dagster as dg

from .resources import default_resources

_package = sys.modules[__name__]

build_dataset_job = dg.define_asset_job(
    "build_dataset",
    selection=dg.AssetSelection.groups("dataset"),
    description="Raw corpus -> captions -> segments -> phrases -> subject matches -> webdataset shards.",
)

defs = dg.Definitions(
    assets=dg.load_assets_from_package_module(_package),
    asset_checks=dg.load_asset_checks_from_package_module(_package),
    jobs=[build_dataset_job],
    resources=default_resources(),
    # One process per run: a model resource loads once and serves every step; model steps are
    # serialised by the `gpu` pool anyway, and a separate interpreter per step would reload torch.
    executor=dg.in_process_executor,
)
