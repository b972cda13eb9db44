"""The Dagster instance of a deployment, seen from the command line: set it up, register
corpora (the ``corpus`` partitions), and list the corpora whose dataset build failed.

Used by ``fc-pipeline instance`` / ``fc-pipeline corpus`` and by the demo; Dagster is imported
lazily, so the rest of the library never needs it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DAGSTER_HOME = REPO_ROOT / ".dagster_home"
CORPUS_PARTITIONS = "corpus"  # the dynamic partitions of the dataset assets (one per corpus)
GPU_POOL = "gpu"  # the concurrency pool of every step that needs the accelerator
DATASET_ASSETS = (
    "corpus_images",
    "captions",
    "panoptic_segments",
    "noun_phrases",
    "subject_matches",
    "training_shards",
)


def dagster_home(path: str | Path | None = None) -> Path:
    """``path``, else ``$DAGSTER_HOME``, else ``<repo>/.dagster_home`` (absolute)."""
    return Path(path or os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()


def prepare_dagster_home(path: str | Path | None = None) -> Path:
    """Create the instance directory, copy the repo's dagster.yaml into it unless one is already
    there (a user's own instance config is never overwritten), and give the ``gpu`` pool one slot
    per visible GPU (at least 1) unless a limit is already set. Returns the directory."""
    import dagster as dg
    import torch

    home = dagster_home(path)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        if GPU_POOL not in instance.event_log_storage.get_concurrency_keys():
            instance.event_log_storage.set_concurrency_slots(GPU_POOL, max(1, torch.cuda.device_count()))
    return home


def register_corpora(names: list[str], path: str | Path | None = None) -> list[str]:
    """Add ``names`` as ``corpus`` partitions (known ones are kept); returns the names that were new."""
    import dagster as dg

    from fc_pipeline.data.corpora import CORPUS_NAME

    invalid = [name for name in names if not CORPUS_NAME.match(name)]
    if invalid:
        raise ValueError(f"invalid corpus names {invalid}: use letters, digits, '_', '.' or '-' (max 128)")
    with dg.DagsterInstance.from_config(str(prepare_dagster_home(path))) as instance:
        known = set(instance.get_dynamic_partitions(CORPUS_PARTITIONS))
        new = [name for name in dict.fromkeys(names) if name not in known]
        instance.add_dynamic_partitions(CORPUS_PARTITIONS, new)
    return new


def registered_corpora(path: str | Path | None = None) -> list[str]:
    """The registered ``corpus`` partitions, in registration order."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home(path))) as instance:
        return list(instance.get_dynamic_partitions(CORPUS_PARTITIONS))


def failed_corpora(path: str | Path | None = None) -> list[str]:
    """Registered corpora whose latest attempt at some dataset asset failed (to backfill again)."""
    import dagster as dg

    partitions = dg.DynamicPartitionsDefinition(name=CORPUS_PARTITIONS)
    with dg.DagsterInstance.from_config(str(dagster_home(path))) as instance:
        corpora = list(instance.get_dynamic_partitions(CORPUS_PARTITIONS))
        failed = set()
        for asset in DATASET_ASSETS:
            statuses = instance.get_status_by_partition(dg.AssetKey(asset), corpora, partitions) or {}
            failed |= {corpus for corpus, status in statuses.items() if status == dg.AssetPartitionStatus.FAILED}
    return [corpus for corpus in corpora if corpus in failed]


def dataset_job():
    """The code location's ``build_dataset`` job (reconstructable: every step process loads it again)."""
    import assets

    return assets.defs.resolve_job_def("build_dataset")


def build_corpus(
    instance,
    corpus: str,
    *,
    chunks: int | None = None,
    workers: int | None = None,
    run_config: dict | None = None,
):
    """Run ``build_dataset`` for one corpus partition on ``instance`` from this process (as
    ``dagster job execute`` would; the run is in the instance's history), with its per-image steps
    in ``chunks`` chunks (default: the code location's) and up to ``workers`` steps at once (needs the
    multiprocess executor). Returns the ``dg.ExecuteJobResult``; a failed run does not raise."""
    import dagster as dg

    config = dict(run_config or {})
    if chunks is not None:
        resources = dict(config.get("resources") or {})
        store = dict(resources.get("store") or {})
        store["config"] = {**(store.get("config") or {}), "chunks": chunks}
        config["resources"] = {**resources, "store": store}
    if workers is not None:
        executor = dataset_job().executor_def.name
        if executor != "multiprocess":
            raise ValueError(
                f"workers need the multiprocess executor (FC_PIPELINE_EXECUTOR=multiprocess), not {executor}"
            )
        config["execution"] = {"config": {"max_concurrent": workers}}
    return dg.execute_job(
        dg.reconstructable(dataset_job), instance, run_config=config, tags={"dagster/partition": corpus}
    )
