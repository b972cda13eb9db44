"""Training asset (paper §4.2): one FastComposer checkpoint trained on the shards of every corpus.

``fastcomposer_checkpoint`` depends on all partitions of ``training_shards``. It trains only on
corpora whose blocking shard checks passed on their latest shards (a corpus with a failed check
stops the run with the list of problems), writes the run's :class:`fc_pipeline.training.train.TrainConfig`
as JSON and launches ``python -m fc_pipeline.training.train`` (``accelerate launch`` for several processes
or machines, :func:`fc_pipeline.training.launch.training_command`) through Dagster Pipes: the child streams
its log lines and reports steps, final losses and the checkpoint path; this side adds the loss
curve and the data versions of the shards it trained on.

A run's directory is ``<data_root>/checkpoints/run-<id>``, ``<id>`` a hash of everything that
shapes the trajectory (hyper-parameters, effective batch and the shards' data versions, not
``max_steps``), so re-materialising the same settings resumes the run (or returns at once when it
is complete), and raising ``max_steps`` continues it. A CUDA out-of-memory exit is retried (twice)
with half the per-process batch and twice the gradient accumulation: same effective batch.
"""

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field

from fc_pipeline.storage import write_json
from fc_pipeline.training.launch import training_command
from fc_pipeline.training.train import OOM_EXIT_CODE, TINY_PRESET, TrainConfig

from .checks import failed_shard_checks
from .dataset import SHARDS, shards_version, training_shards
from .deployment import TRAINING_OP_TAGS, training_workers
from .metadata import save_preview
from .partitions import corpus_partitions, latest_materialization
from .resources import GPU_POOL, DatasetStore
from .settings import STEP_CONFIGS, check_run_config, config_class

DATA_VERSION_TAG = "dagster/data_version"
OOM_RETRIES = 2
# settings that do not change what a step computes: a run that differs only in these resumes
RUN_INDEPENDENT = (
    "output_dir",
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "num_workers",
    "resume",
    "progress",
    "train_batch_size",
    "gradient_accumulation_steps",
)
# TrainConfig fields the asset sets itself: the data, the run directory, no progress bar
LIBRARY_ONLY = ("shards", "output_dir", "progress")


HyperParameters = config_class(
    TrainConfig,
    "HyperParameters",
    "The library's TrainConfig fields (fc_pipeline.training.train), CPU demo defaults.",
    exclude=LIBRARY_ONLY,
    defaults=TINY_PRESET,
)


class TrainingConfig(HyperParameters):
    """Hyper-parameters of the run: every field of the library's ``TrainConfig`` (defaults: the CPU demo,
    ``TINY_PRESET``; paper values in each description) plus which data and how many processes."""

    corpora: list[str] = Field(
        default=[], description="Corpora (partitions) to train on; empty: every registered corpus with shards."
    )
    shards: list[str] = Field(
        default=[], description="Dataset dirs/URLs with train/*.tar to use instead of the corpora's shards."
    )
    require_passing_checks: bool = Field(
        default=True, description="Refuse corpora whose blocking shard checks did not pass."
    )
    num_processes: int = Field(
        default=0, ge=0, description="Training processes per machine; 0: one per visible GPU, else 1 (paper 8)."
    )
    num_machines: int = Field(
        default=1, ge=1, description="Machines of a multi-node run (this step is rank 0; see docs/deploy-k8s.md)."
    )
    main_process_ip: str = Field(
        default="",
        description=(
            "Address of rank 0 for a multi-node run; empty: on Kubernetes, machines 1..N-1 are started "
            "from this step's pod."
        ),
    )
    main_process_port: int = Field(default=29500, ge=1, le=65535, description="Rendezvous port of a multi-node run.")


# asset-only fields: which data, how many processes; the rest is the library's TrainConfig
ASSET_ONLY = tuple(name for name in TrainingConfig.model_fields if name not in HyperParameters.model_fields)


def training_corpora(context: dg.AssetExecutionContext, config: TrainingConfig, store: DatasetStore) -> list[str]:
    """The corpora to train on: configured, else every registered one with shards; refuses corpora
    whose blocking shard checks did not pass on their latest shards."""
    registered = context.instance.get_dynamic_partitions(corpus_partitions.name)
    corpora = list(config.corpora) or [c for c in registered if (store.path(c, SHARDS) / "train").is_dir()]
    unknown = sorted(set(corpora) - set(registered))
    if unknown:
        raise dg.Failure(f"not registered corpora: {unknown}; registered: {registered}")
    if not corpora:
        raise dg.Failure("no corpus has training shards yet; materialise training_shards for a corpus first")
    failing = failed_shard_checks(context.instance, corpora) if config.require_passing_checks else {}
    if failing:
        raise dg.Failure(
            "blocking checks have not passed on the latest shards of: "
            + "; ".join(
                f"{corpus} ({', '.join(f'{name} {why}' for name, why in checks.items())})"
                for corpus, checks in failing.items()
            )
            + ". Fix the data and re-materialise those partitions, or leave them out with config `corpora`.",
            metadata={"failing_checks": dg.MetadataValue.json(failing)},
        )
    return corpora


def shards_data_version(context: dg.AssetExecutionContext, corpus: str, shards_dir: Path) -> str:
    """The data version ``training_shards`` last recorded for the corpus, else the fingerprint it would record."""
    materialization = latest_materialization(context.instance, training_shards.key, corpus)
    recorded = materialization.tags.get(DATA_VERSION_TAG) if materialization and materialization.tags else None
    return recorded or shards_version(shards_dir)


def train_config(
    config: TrainingConfig, shards: list[str], runs_dir: Path, data_versions: dict[str, str], retry: int = 0
):
    """The library's ``TrainConfig`` of the asset config, in the run's own directory; retry ``k``
    after an out-of-memory exit uses a 2^k times smaller batch with 2^k times the accumulation."""
    options = config.model_dump(exclude=set(ASSET_ONLY))
    split = min(2**retry, options["train_batch_size"])
    options.update(
        localization_layers=config.localization_layers or None,
        train_batch_size=options["train_batch_size"] // split,
        gradient_accumulation_steps=options["gradient_accumulation_steps"] * split,
        progress=False,
    )
    effective_batch = options["train_batch_size"] * options["gradient_accumulation_steps"]
    identity = {k: v for k, v in options.items() if k not in RUN_INDEPENDENT}
    identity |= {"effective_batch": effective_batch, "shards": data_versions}
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return TrainConfig(shards=shards, output_dir=str(runs_dir / f"run-{run_id}"), **options)


def loss_curve(metrics_path: Path, out_path: Path) -> str:
    """Plot loss, L_noise and L_loc per step from ``metrics.jsonl``; save a PNG, return inline markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    figure, (noise_axis, loc_axis) = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    noise_axis.plot(steps, [r["loss"] for r in rows], label="loss")
    noise_axis.plot(steps, [r["l_noise"] for r in rows], label="L_noise", linestyle="--")
    noise_axis.set(xlabel="step", title="loss = L_noise + λ·L_loc")
    noise_axis.legend()
    loc_axis.plot(steps, [r["l_loc"] for r in rows], color="tab:red")
    loc_axis.set(xlabel="step", title="L_loc")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return save_preview(Image.open(buffer), out_path)


@dg.asset(
    deps=[dg.AssetDep(training_shards, partition_mapping=dg.AllPartitionMapping())],
    group_name="training",
    pool=GPU_POOL,
    op_tags=TRAINING_OP_TAGS,
    kinds={"pytorch", "safetensors"},
)
def fastcomposer_checkpoint(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    store: DatasetStore,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """FastComposer (fuser, UNet, last CLIP vision blocks) trained with L_noise + λ·L_loc on the
    shards of every corpus; a diffusers checkpoint directory (``FastComposerPipeline.from_pretrained``)."""
    import torch

    check_run_config(context)
    if config.shards:
        datasets = {f"shards[{i}]": Path(url) for i, url in enumerate(config.shards)}
        versions = {name: shards_version(path) for name, path in datasets.items()}
    else:
        datasets = {corpus: store.path(corpus, SHARDS) for corpus in training_corpora(context, config, store)}
        versions = {corpus: shards_data_version(context, corpus, path) for corpus, path in datasets.items()}
    run = train_config(
        config, [str(path) for path in datasets.values()], store.checkpoints_dir, versions, context.retry_number
    )
    run_dir = Path(run.output_dir)
    config_path = run_dir / "train_config.json"
    write_json(dataclasses.asdict(run), config_path)
    processes = config.num_processes or max(1, torch.cuda.device_count())
    # On CPU one OpenMP thread is fastest for these models: two threads on a busy machine spin.
    env = {} if torch.cuda.is_available() else {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with training_workers(
        config_path,
        num_machines=config.num_machines,
        processes_per_machine=processes,
        main_process_ip=config.main_process_ip or None,
        main_process_port=config.main_process_port,
        log=context.log.info,
    ) as main_process_ip:
        command = training_command(
            config_path,
            num_processes=processes * config.num_machines,
            num_machines=config.num_machines,
            main_process_ip=main_process_ip,
            main_process_port=config.main_process_port,
        )
        context.log.info(f"training on {list(datasets)} in {run_dir}: {' '.join(command)}")
        try:
            reported = pipes_subprocess_client.run(command=command, context=context, env=env).get_materialize_result()
        except dg.DagsterPipesExecutionError as error:
            if f"code {OOM_EXIT_CODE}" in str(error) and run.train_batch_size > 1:
                context.log.warning(f"out of GPU memory at batch {run.train_batch_size}; retrying with half the batch")
                raise dg.RetryRequested(max_retries=OOM_RETRIES) from error
            raise

    curve_path = run_dir / "loss_curve.png"
    samples = {name: _sample_count(path) for name, path in datasets.items()}
    return dg.MaterializeResult(
        metadata={
            **(reported.metadata or {}),
            "loss_curve": dg.MetadataValue.md(loss_curve(run_dir / "metrics.jsonl", curve_path)),
            "loss_curve_path": dg.MetadataValue.path(str(curve_path)),
            "run_dir": dg.MetadataValue.path(str(run_dir)),
            "train_config": dg.MetadataValue.path(str(config_path)),
            "corpora": dg.MetadataValue.json(list(datasets)),
            "shards_data_versions": dg.MetadataValue.json(versions),
            "train_samples": dg.MetadataValue.json(samples),
            "dataset_samples": sum(samples.values()),
            "train_batch_size": run.train_batch_size,
            "gradient_accumulation_steps": run.gradient_accumulation_steps,
            "num_processes": processes * config.num_machines,
        },
        check_results=reported.check_results,
        tags=reported.tags,
    )


STEP_CONFIGS[fastcomposer_checkpoint.op.name] = TrainingConfig


def _sample_count(shards_dir: Path) -> int:
    """Training samples of a dataset: the rows of its train shards' parquet sidecars (0 without sidecars)."""
    return sum(pq.read_metadata(path).num_rows for path in (shards_dir / "train").glob("[0-9]*.parquet"))
