"""One small demo corpus (partition ``demo``) pushed through the dataset chain once per session (in-process)."""

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

import assets
from assets import checks, dataset
from assets.resources import CaptionerResource, DatasetStore

SMALL_CORPUS = 8  # 7 scenes (4 annotated, 1 caption-only, 2 bare) + the corrupt file
RUN_CONFIG = {"ops": {"corpus_images": {"config": {"demo_images": SMALL_CORPUS}}}}
DATASET_ASSETS = dataset.CHAIN
DATASET_CHECKS = [
    checks.readable_images,
    checks.caption_non_empty_rate,
    checks.shards_readable,
    checks.samples_with_subjects,
    checks.failure_rate,
]


CORPUS = "demo"


@dataclass
class Chain:
    root: Path
    resources: dict
    instance: dg.DagsterInstance
    result: dg.ExecuteInProcessResult

    def store(self) -> DatasetStore:
        return self.resources["store"]

    def path(self, name: str) -> Path:
        """A file of the demo corpus's dataset dir."""
        return self.store().path(CORPUS, name)

    def materialize(
        self, selection: list, run_config: dict | None = None, partition: str = CORPUS
    ) -> dg.ExecuteInProcessResult:
        """Run ``selection`` (assets and checks) again on the same data root and instance."""
        return dg.materialize(
            selection,
            resources=self.resources,
            instance=self.instance,
            partition_key=partition,
            run_config=RUN_CONFIG if run_config is None else run_config,
            raise_on_error=False,
        )


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    """Metadata values of the (single) materialisation of ``asset`` in ``result``."""
    (event,) = result.asset_materializations_for_node(asset)
    return {key: getattr(value, "value", value) for key, value in event.metadata.items()}


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> Chain:
    root = tmp_path_factory.mktemp("fc_data")
    resources = {
        **assets.defs.resources,
        "store": DatasetStore(data_root=str(root)),
        # a random tiny BLIP-2 says nothing better with 30 tokens than with 8
        "captioner": CaptionerResource(max_new_tokens=8),
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", [CORPUS])
        result = dg.materialize(
            DATASET_ASSETS + DATASET_CHECKS,
            resources=resources,
            instance=instance,
            partition_key=CORPUS,
            run_config=RUN_CONFIG,
        )
        yield Chain(root, resources, instance, result)
