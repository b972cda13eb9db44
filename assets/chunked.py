"""Dataset assets whose per-image work fans out over chunks of one corpus.

See docs/architecture.md, "Fan-out inside a corpus". Such an asset is a graph of three ops
(``captions`` shown)::

    captions_chunks ─┬─> captions_chunk[0_of_K] ─┬─> captions_merge   (the materialisation)
                     └─> captions_chunk[1_of_K] ─┘

K is the ``chunks`` setting of the ``store`` resource (:class:`~assets.resources.DatasetStore`;
``FC_PIPELINE_CHUNKS`` for the deployment, ``resources.store.config.chunks`` for one run). Every
chunk is a step of its own: the multiprocess executor runs them side by side, the k8s executor
gives each its own pod, and the chunks of a model step each take a slot of the ``gpu`` pool (one
GPU each). The asset keeps its one ``corpus`` partition, its config (mapped onto the three ops),
its checks and its data version, so sensors, schedules, backfills and the training gate do not
see the chunks. Nothing passes between the ops but their order: each reads and writes the
corpus's files (:mod:`fc_pipeline.data.chunks`), so no IO manager is involved.
"""

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dagster as dg

from .deployment import GPU_OP_TAGS
from .resources import GPU_POOL
from .settings import check_run_config


@dataclass(frozen=True)
class Chunk:
    """Chunk ``index`` of ``count``; its Dagster mapping key is ``<index>_of_<count>``."""

    index: int
    count: int

    @property
    def key(self) -> str:
        return f"{self.index}_of_{self.count}"

    @classmethod
    def of(cls, context: dg.OpExecutionContext) -> "Chunk":
        """The chunk a mapped step runs (from its mapping key)."""
        index, count = context.get_mapping_key().split("_of_")
        return cls(int(index), int(count))


@dataclass(frozen=True)
class MergeResult:
    """What the merge op reports: the asset's metadata and data version."""

    metadata: dict[str, Any]
    version: str


@dataclass(frozen=True)
class ChunkedGraph:
    """What a ``@dg.graph_asset`` of chunked work needs: its ``ins``, its config mapping and the
    body to return from the decorated function (called with the upstream inputs, in ``ins`` order)."""

    ins: dict[str, dg.AssetIn]
    config: dg.ConfigMapping
    compose: Callable[..., Any]


def share_cores(context: dg.OpExecutionContext, chunks: int) -> None:
    """On the multiprocess executor, give this step process its share of the CPU cores: chunks run
    side by side, and K processes with a thread per core each thrash (2 chunks on 2 cores, 2 threads
    each: 6× slower than 1 thread each). An ``OMP_NUM_THREADS`` of the user's wins."""
    if os.environ.get("OMP_NUM_THREADS") or context.job_def.executor_def.name != "multiprocess":
        return
    import torch

    execution = (context.run_config.get("execution") or {}).get("config") or {}
    cores = os.cpu_count() or 1
    side_by_side = max(1, min(chunks, execution.get("max_concurrent") or cores))
    torch.set_num_threads(max(1, cores // side_by_side))


def chunked_graph(
    name: str,
    config_class: type[dg.Config],
    *,
    after: Iterable[dg.AssetsDefinition] = (),
    run_chunk: Callable[[dg.OpExecutionContext, Any, Chunk], dict[str, Any]],
    merge: Callable[[dg.OpExecutionContext, Any, int], MergeResult],
    prepare: Callable[[dg.OpExecutionContext, Any], None] | None = None,
    resources: Iterable[str] = (),
    gpu: bool = False,
) -> ChunkedGraph:
    """The parts of a ``@dg.graph_asset`` whose work runs in chunks, after the assets ``after``
    (whose files it reads; no value is loaded).

    ``prepare(context, config)`` runs once before the chunks (in ``<name>_chunks``),
    ``run_chunk(context, config, chunk)`` in each ``<name>_chunk`` step (its return value is that
    step's output metadata; ``resources`` are the resource keys it needs; with ``gpu`` the step is
    in the ``gpu`` pool and asks the k8s executor for a GPU node), ``merge(context, config, K)`` in
    ``<name>_merge``, whose metadata and data version are the asset's. All three get the asset's
    config (``config_class``).
    """
    store = {"store"}
    upstream = [a.key.path[-1] for a in after]

    def plan(context: dg.OpExecutionContext, config: config_class):
        check_run_config(context)
        chunks = context.resources.store.chunks
        if prepare is not None:
            prepare(context, config)
        context.log.info(f"{name}[{context.partition_key}]: {chunks} chunk(s)")
        for index in range(chunks):
            yield dg.DynamicOutput(None, mapping_key=Chunk(index, chunks).key)

    def chunk(context: dg.OpExecutionContext, config: config_class):
        part = Chunk.of(context)
        share_cores(context, part.count)
        metadata = run_chunk(context, config, part)
        context.log.info(f"{name}[{context.partition_key}] chunk {part.index + 1} of {part.count}: {metadata}")
        yield dg.Output(None, metadata={"chunk": part.key, **metadata})

    def finish(context: dg.OpExecutionContext, config: config_class):
        result = merge(context, config, context.resources.store.chunks)
        with warnings.catch_warnings():  # Output's data_version (beta) is how a graph-backed asset reports one
            warnings.simplefilter("ignore", dg.BetaWarning)
            output = dg.Output(None, metadata=result.metadata, data_version=dg.DataVersion(result.version[:16]))
        yield output

    plan_op = dg.op(
        name=f"{name}_chunks",
        ins={key: dg.In(dg.Nothing) for key in upstream},
        out=dg.DynamicOut(dg.Nothing),
        required_resource_keys=store,
    )(plan)
    chunk_op = dg.op(
        name=f"{name}_chunk",
        ins={"chunk": dg.In(dg.Nothing)},
        out=dg.Out(dg.Nothing),
        required_resource_keys=store | set(resources),
        pool=GPU_POOL if gpu else None,
        tags=GPU_OP_TAGS if gpu else None,
    )(chunk)
    merge_op = dg.op(
        name=f"{name}_merge",
        ins={"chunks": dg.In(dg.Nothing)},
        out=dg.Out(dg.Nothing),
        required_resource_keys=store | set(resources),
    )(finish)

    def compose(*inputs: Any) -> Any:
        mapped = plan_op(**dict(zip(upstream, inputs, strict=True))).map(lambda part: chunk_op(chunk=part))
        return merge_op(chunks=mapped.collect())

    def to_ops(values: config_class) -> dict:
        given = {"config": values.model_dump()}
        return {plan_op.name: given, chunk_op.name: given, merge_op.name: given}

    ins = {key: dg.AssetIn(key=a.key, dagster_type=dg.Nothing) for key, a in zip(upstream, after, strict=True)}
    return ChunkedGraph(ins, dg.config_mapping(to_ops), compose)
