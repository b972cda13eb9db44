"""Jobs, sensors and the schedule that run the pipeline as a service.

* ``corpus_sensor`` (every minute): registers each new corpus under ``<data_root>/corpora`` as a
  ``corpus`` partition and requests a ``build_dataset`` run for it; a known corpus whose files
  changed (files added, removed or renamed into place) gets a run too. Its cursor holds each
  corpus's folder states (:func:`fc_pipeline.data.corpora.watch_corpus`), so a tick costs one
  ``stat`` per folder of an unchanged corpus, and a restarted daemon does not redo work.
* ``nightly_dataset_refresh`` (02:00 UTC): catches up every registered corpus whose files differ
  from what its last ``corpus_images`` materialisation scanned (e.g. the sensor was off, or a run
  failed).
* ``train_on_new_samples`` (every 5 minutes): the training policy. It requests a ``train`` run
  (checkpoint + evaluation) when the corpora's shards hold at least ``FC_PIPELINE_TRAIN_MIN_NEW_SAMPLES``
  (default 1000) training samples more than the last checkpoint was trained on, and every corpus's
  blocking shard checks passed on its latest shards.

Runs are incremental (only new images are processed), so a redundant request costs little.
"""

import json
import os

import dagster as dg

from fc_pipeline.data.corpora import corpus_signature, watch_corpus

from .checks import failed_shard_checks
from .dataset import GROUP as DATASET_GROUP
from .dataset import corpus_images, training_shards
from .evaluation import evaluation_report
from .partitions import corpus_partitions, latest_materialization
from .resources import DatasetStore
from .training import fastcomposer_checkpoint

MIN_NEW_SAMPLES_ENV = "FC_PIPELINE_TRAIN_MIN_NEW_SAMPLES"
DEFAULT_MIN_NEW_SAMPLES = 1000

build_dataset_job = dg.define_asset_job(
    "build_dataset",
    selection=dg.AssetSelection.groups(DATASET_GROUP),
    partitions_def=corpus_partitions,
    description="One corpus: raw images -> captions -> segments -> phrases -> subject matches -> webdataset shards.",
)

train_job = dg.define_asset_job(
    "train",
    selection=dg.AssetSelection.assets(fastcomposer_checkpoint, evaluation_report),
    description="Train FastComposer on the shards of every corpus whose checks passed, then evaluate the checkpoint.",
)


def latest_partition_metadata(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str) -> dict:
    """Metadata values of the latest materialisation of one partition of an asset ({} if none)."""
    materialization = latest_materialization(instance, asset_key, partition)
    return {key: value.value for key, value in materialization.metadata.items()} if materialization else {}


@dg.sensor(
    job=build_dataset_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers new corpora under <data_root>/corpora and builds every corpus whose files changed.",
)
def corpus_sensor(context: dg.SensorEvaluationContext, store: DatasetStore) -> dg.SensorResult | dg.SkipReason:
    seen = json.loads(context.cursor) if context.cursor else {}
    seen = {name: state for name, state in seen.items() if isinstance(state, dict)}  # older cursors: rescan once
    states = {name: watch_corpus(path, seen.get(name)) for name, path in store.corpora().items()}
    signatures = {name: state["signature"] for name, state in states.items()}
    registered = set(context.instance.get_dynamic_partitions(corpus_partitions.name))
    new = sorted(name for name in signatures if name not in registered)
    changed = sorted(
        name
        for name, signature in signatures.items()
        if name in registered and seen.get(name, {}).get("signature") != signature
    )
    if not new and not changed:  # the cursor still moves: a listed folder is not listed again
        skip = f"no new or changed corpus under {store.corpora_dir} ({len(signatures)} known)"
        return dg.SensorResult(skip_reason=skip, cursor=json.dumps(states, sort_keys=True))
    run_requests = [
        dg.RunRequest(
            partition_key=name,
            run_key=f"{name}:{signatures[name]}",
            tags={"fc_pipeline/trigger": "new corpus" if name in new else "corpus changed"},
        )
        for name in new + changed
    ]
    context.log.info(f"new corpora: {new or 'none'}; changed: {changed or 'none'}")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[corpus_partitions.build_add_request(new)] if new else [],
        cursor=json.dumps(states, sort_keys=True),
    )


@dg.schedule(
    job=build_dataset_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly catch-up: rebuild every registered corpus whose files differ from its last scan.",
)
def nightly_dataset_refresh(context: dg.ScheduleEvaluationContext, store: DatasetStore):
    requests = []
    for corpus in context.instance.get_dynamic_partitions(corpus_partitions.name):
        signature = corpus_signature(store.source(corpus))
        if signature == "missing":
            context.log.warning(f"corpus {corpus!r} is registered but {store.source(corpus)} is gone")
            continue
        scanned = latest_partition_metadata(context.instance, corpus_images.key, corpus).get("source_signature")
        if scanned != signature:
            requests.append(dg.RunRequest(partition_key=corpus, run_key=f"nightly:{corpus}:{signature}"))
    return requests or dg.SkipReason("every registered corpus is up to date")


def min_new_samples() -> int:
    """The training threshold: ``$FC_PIPELINE_TRAIN_MIN_NEW_SAMPLES`` (default 1000)."""
    return int(os.environ.get(MIN_NEW_SAMPLES_ENV, DEFAULT_MIN_NEW_SAMPLES))


@dg.sensor(
    job=train_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"Trains when the shards hold ${MIN_NEW_SAMPLES_ENV} (default {DEFAULT_MIN_NEW_SAMPLES}) more training "
    "samples than the last checkpoint saw, and every corpus passed its blocking checks.",
)
def train_on_new_samples(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    instance = context.instance
    corpora = instance.get_dynamic_partitions(corpus_partitions.name)
    available = {}
    for corpus in corpora:
        samples = latest_partition_metadata(instance, training_shards.key, corpus).get("samples_out")
        if samples:
            available[corpus] = samples.get("train", 0)
    total = sum(available.values())
    event = instance.get_latest_materialization_event(fastcomposer_checkpoint.key)
    trained = (
        event.asset_materialization.metadata["dataset_samples"].value
        if event and "dataset_samples" in event.asset_materialization.metadata
        else 0
    )
    threshold = min_new_samples()
    if total - trained < threshold:
        return dg.SkipReason(
            f"{total - trained} new training samples since the last checkpoint (threshold {threshold})"
        )
    failing = failed_shard_checks(instance, sorted(available))
    if failing:
        return dg.SkipReason(f"waiting for corpora whose blocking checks did not pass: {json.dumps(failing)}")
    return dg.RunRequest(run_key=f"train:{total}", tags={"fc_pipeline/train_samples": str(total)})
