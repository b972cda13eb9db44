"""Where the steps of a run execute: one process (default), one process per step, or one Kubernetes pod per step.

``FC_PIPELINE_EXECUTOR`` picks the executor of the code location (:func:`executor_from_env`):

* unset / ``in_process``: the steps one after another in the run's own process (a chunked step's chunks too);
* ``multiprocess``: one process per step on the same machine (Dagster's ``multiprocess_executor``),
  forked from a server that imported the code location and its libraries once per run
  (:data:`PRELOAD_MODULES`; a step then starts in well under a second instead of re-importing torch);
* ``k8s``: one Kubernetes Job per step (``dagster_k8s.k8s_job_executor``), configured from
  ``FC_PIPELINE_K8S_*`` variables (:func:`k8s_executor_config`); deploy/k8s/ and docs/deploy-k8s.md.

:data:`GPU_OP_TAGS` is the ``dagster-k8s/config`` tag of the steps of the ``gpu`` pool: one NVIDIA GPU,
a GPU node (``FC_PIPELINE_GPU_NODE_SELECTOR``, JSON) and a toleration of the GPU nodes' taint;
:data:`TRAINING_OP_TAGS` asks for ``FC_PIPELINE_TRAINING_GPUS`` GPUs. The in-process and multiprocess
executors ignore them. :func:`training_workers` runs machines 1..N-1 of a multi-node training run as a
Kubernetes Indexed Job beside the training step's pod (machine 0).
"""

import copy
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from fc_pipeline.training.launch import DEFAULT_PORT

EXECUTOR_ENV = "FC_PIPELINE_EXECUTOR"
K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
# the label NVIDIA's GPU feature discovery (part of the GPU operator) puts on every GPU node
DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
# every step pod: room for pyarrow/spaCy work on a corpus; GPU steps ask for more (gpu_step_k8s_config)
DEFAULT_STEP_K8S_CONFIG = {
    "container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}}},
    "job_spec_config": {"ttl_seconds_after_finished": 24 * 3600},  # keep finished step pods a day for their logs
}


def _json(env: Mapping[str, str], name: str, default: Any) -> Any:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} must be JSON: {error}") from None


def _names(env: Mapping[str, str], name: str) -> list[str]:
    """A comma-separated list of Kubernetes object names."""
    return [part.strip() for part in env.get(name, "").split(",") if part.strip()]


def gpu_step_k8s_config(env: Mapping[str, str] = os.environ, gpus: int = 1) -> dict[str, Any]:
    """Kubernetes config of a step that needs ``gpus`` GPUs: resources, node selector and GPU toleration."""
    node_selector = _json(env, "FC_PIPELINE_GPU_NODE_SELECTOR", DEFAULT_GPU_NODE_SELECTOR)
    if not isinstance(node_selector, dict) or not all(isinstance(v, str) for v in node_selector.values()):
        raise ValueError(f"FC_PIPELINE_GPU_NODE_SELECTOR must be a JSON object of strings, not {node_selector!r}")
    return {
        "container_config": {
            # an extended resource is requested by its limit; CPU/memory: model loading and data decoding
            "resources": {
                "limits": {GPU_RESOURCE: str(gpus)},
                "requests": {"cpu": str(4 * gpus), "memory": f"{32 * gpus}Gi"},
            },
        },
        "pod_spec_config": {
            "node_selector": node_selector,
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


GPU_OP_TAGS: dict[str, Any] = {K8S_CONFIG_TAG: gpu_step_k8s_config()}
# the training step's pod is machine 0 of the run; with several GPUs per machine it asks for all of them
TRAINING_OP_TAGS: dict[str, Any] = {
    K8S_CONFIG_TAG: gpu_step_k8s_config(gpus=int(os.environ.get("FC_PIPELINE_TRAINING_GPUS") or 1))
}


def k8s_executor_config(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Config of ``k8s_job_executor`` from ``FC_PIPELINE_K8S_*`` variables.

    What is not set here comes from the run launcher and the code location (image, service account,
    env, volumes such as the data PVC: the helm chart passes the user deployment's to launched runs).
    """
    config: dict[str, Any] = {
        "image_pull_policy": env.get("FC_PIPELINE_K8S_IMAGE_PULL_POLICY") or "IfNotPresent",
        # step pods of one run at once; GPU steps are bounded across runs by the `gpu` pool
        "max_concurrent": int(env.get("FC_PIPELINE_K8S_MAX_CONCURRENT") or 8),
        "step_k8s_config": _json(env, "FC_PIPELINE_K8S_STEP_CONFIG", DEFAULT_STEP_K8S_CONFIG),
    }
    if env.get("FC_PIPELINE_K8S_NAMESPACE"):
        config["job_namespace"] = env["FC_PIPELINE_K8S_NAMESPACE"]
    if config_maps := _names(env, "FC_PIPELINE_K8S_ENV_CONFIG_MAPS"):
        config["env_config_maps"] = config_maps
    if secrets := _names(env, "FC_PIPELINE_K8S_ENV_SECRETS"):
        config["env_secrets"] = secrets
    return config


# what the step processes of the multiprocess executor find imported (forkserver preload): the code
# location and its libraries, and what a step's instance and plan import on first use (≈ 0.7 s a
# step otherwise); a module missing from another Dagster version is skipped by the forkserver
PRELOAD_MODULES = (
    "assets",
    "torch",
    "transformers",
    "spacy",
    "open_clip",
    "sentence_transformers",
    "dagster._core.instance.factory",
    "dagster._core.storage.sqlite_storage",
    "dagster._core.storage.runs.sqlite.sqlite_run_storage",
    "dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log",
    "dagster._core.storage.schedules.sqlite.sqlite_schedule_storage",
    "dagster._core.remote_representation",
    "dagster._core.snap",
    "dagster._core.execution.context_creation_job",
    "upath",
)


def _forkserver_by_default(config: dict[str, Any]) -> dict[str, Any]:
    """The multiprocess executor's config with forkserver start and :data:`PRELOAD_MODULES`
    unless the run config names a start method."""
    return {"start_method": {"forkserver": {"preload_modules": list(PRELOAD_MODULES)}}, **config}


MULTIPROCESS_EXECUTOR = dg.multiprocess_executor.configured(
    _forkserver_by_default, name="multiprocess", config_schema=dg.multiprocess_executor.config_schema.config_type
)


def executor_from_env(env: Mapping[str, str] = os.environ) -> dg.ExecutorDefinition:
    """The executor ``FC_PIPELINE_EXECUTOR`` names: ``in_process`` (default), ``multiprocess`` or ``k8s``."""
    kind = env.get(EXECUTOR_ENV) or "in_process"
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "multiprocess":
        return MULTIPROCESS_EXECUTOR
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor  # only a cluster deployment needs the kubernetes client

        return k8s_job_executor.configured(k8s_executor_config(env), name="k8s")
    raise ValueError(f"{EXECUTOR_ENV} must be in_process, multiprocess or k8s, not {kind!r}")


# what a worker pod's environment must not inherit from machine 0: its own place in the run is set anew
WORKER_ENV = (
    "FC_PIPELINE_NUM_MACHINES",
    "FC_PIPELINE_PROCESSES_PER_MACHINE",
    "FC_PIPELINE_MACHINE_RANK",
    "FC_PIPELINE_MACHINE_RANK_OFFSET",
    "FC_PIPELINE_MAIN_PROCESS_IP",
    "FC_PIPELINE_MAIN_PROCESS_PORT",
)
SERVICE_ACCOUNT_VOLUME = "kube-api-access-"  # the API token volume Kubernetes adds to every pod


def worker_job(
    pod,
    config_path: str | Path,
    *,
    num_machines: int,
    processes_per_machine: int,
    main_process_port: int = DEFAULT_PORT,
):
    """The Indexed Job (``kubernetes.client.V1Job``) of machines 1..N-1 of a training run whose machine 0 is ``pod``.

    Each worker pod copies ``pod``'s spec (image, env, data volume, GPUs, node selector, tolerations)
    and runs ``python -m fc_pipeline.training.launch --config <config_path>``: pod ``i`` of the Job
    (``JOB_COMPLETION_INDEX``) is machine ``i + 1`` and connects to ``pod``'s IP. The Job belongs to
    ``pod``: Kubernetes deletes it with the pod.
    """
    from kubernetes import client

    spec = copy.deepcopy(pod.spec)
    spec.node_name = spec.hostname = spec.subdomain = None  # the scheduler places each worker
    spec.restart_policy = "Never"
    spec.automount_service_account_token = False  # workers train; they do not talk to the API
    spec.volumes = [v for v in spec.volumes or [] if not v.name.startswith(SERVICE_ACCOUNT_VOLUME)]
    container = spec.containers[0]
    spec.containers = [container]
    container.command = [sys.executable, "-m", "fc_pipeline.training.launch", "--config", str(config_path)]
    container.args = None
    container.volume_mounts = [
        m for m in container.volume_mounts or [] if not m.name.startswith(SERVICE_ACCOUNT_VOLUME)
    ]
    place = {
        "FC_PIPELINE_NUM_MACHINES": num_machines,
        "FC_PIPELINE_PROCESSES_PER_MACHINE": processes_per_machine,
        "FC_PIPELINE_MACHINE_RANK_OFFSET": 1,
        "FC_PIPELINE_MAIN_PROCESS_IP": pod.status.pod_ip,
        "FC_PIPELINE_MAIN_PROCESS_PORT": main_process_port,
    }
    container.env = [e for e in container.env or [] if e.name not in WORKER_ENV] + [
        client.V1EnvVar(name=name, value=str(value)) for name, value in place.items()
    ]
    labels = {"app.kubernetes.io/name": "fc-pipeline", "app.kubernetes.io/component": "training-worker"}
    if run_id := (pod.metadata.labels or {}).get("dagster/run-id"):
        labels["dagster/run-id"] = run_id
    workers = num_machines - 1
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(
            name="fc-train-workers-" + hashlib.sha256(pod.metadata.name.encode()).hexdigest()[:10],
            namespace=pod.metadata.namespace,
            labels=labels,
            owner_references=[
                client.V1OwnerReference(api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid)
            ],
        ),
        spec=client.V1JobSpec(
            completion_mode="Indexed",
            completions=workers,
            parallelism=workers,
            backoff_limit=0,  # a lost worker fails the run's rendezvous anyway: Dagster retries the step
            ttl_seconds_after_finished=3600,
            template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=labels), spec=spec),
        ),
    )


@contextmanager
def training_workers(
    config_path: str | Path,
    *,
    num_machines: int,
    processes_per_machine: int,
    main_process_port: int = DEFAULT_PORT,
    main_process_ip: str | None = None,
    log: Callable[[str], None] = print,
    core_api=None,
    batch_api=None,
    env: Mapping[str, str] = os.environ,
) -> Iterator[str | None]:
    """Machines 1..N-1 of a multi-node training run, while the ``with`` block trains machine 0.

    Yields the main process address for :func:`fc_pipeline.training.launch.training_command`. One machine, or a
    given ``main_process_ip`` (workers started some other way), creates nothing and yields it. Else this
    must run in a Kubernetes pod (the training step's, k8s executor): the workers' Indexed Job
    (:func:`worker_job`) is created from this pod (``$HOSTNAME``) and deleted when the block ends.
    """
    if num_machines <= 1 or main_process_ip:
        yield main_process_ip
        return
    from dagster_k8s.utils import detect_current_namespace
    from kubernetes import client, config

    namespace = detect_current_namespace(None)
    if not namespace or not env.get("HOSTNAME"):
        raise RuntimeError(
            f"{num_machines} machines need either main_process_ip (workers started by hand) or a Kubernetes pod "
            "to start them from (FC_PIPELINE_EXECUTOR=k8s, docs/deploy-k8s.md)"
        )
    if core_api is None or batch_api is None:
        config.load_incluster_config()
    core_api = core_api or client.CoreV1Api()
    batch_api = batch_api or client.BatchV1Api()
    pod = core_api.read_namespaced_pod(name=env["HOSTNAME"], namespace=namespace)
    job = worker_job(
        pod,
        config_path,
        num_machines=num_machines,
        processes_per_machine=processes_per_machine,
        main_process_port=main_process_port,
    )
    batch_api.create_namespaced_job(namespace=namespace, body=job)
    name = job.metadata.name
    log(
        f"started machines 1..{num_machines - 1} as Kubernetes Job {name} "
        f"(kubectl logs -n {namespace} -l job-name={name})"
    )
    try:
        yield pod.status.pod_ip
    finally:
        batch_api.delete_namespaced_job(name=job.metadata.name, namespace=namespace, propagation_policy="Background")
