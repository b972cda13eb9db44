"""Where the steps of a run execute: one process (default), one process per step, or one Kubernetes pod per step.

``FC_PIPELINE_EXECUTOR`` picks the executor of the code location (:func:`executor_from_env`):

* unset / ``in_process``: every step in the run's own process, so a model resource loads once per run;
* ``multiprocess``: one process per step on the same machine (Dagster's ``multiprocess_executor``);
* ``k8s``: one Kubernetes Job per step (``dagster_k8s.k8s_job_executor``), configured from
  ``FC_PIPELINE_K8S_*`` variables (:func:`k8s_executor_config`); deploy/k8s/ and docs/deploy-k8s.md.

:data:`GPU_OP_TAGS` is the ``dagster-k8s/config`` tag of the steps of the ``gpu`` pool: one NVIDIA GPU,
a GPU node (``FC_PIPELINE_GPU_NODE_SELECTOR``, JSON) and a toleration of the GPU nodes' taint. The
in-process and multiprocess executors ignore it.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

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


def gpu_step_k8s_config(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Kubernetes config of a step that needs one GPU: resources, node selector and GPU toleration."""
    node_selector = _json(env, "FC_PIPELINE_GPU_NODE_SELECTOR", DEFAULT_GPU_NODE_SELECTOR)
    if not isinstance(node_selector, dict) or not all(isinstance(v, str) for v in node_selector.values()):
        raise ValueError(f'FC_PIPELINE_GPU_NODE_SELECTOR must be a JSON object of strings, e.g. {{"gpu": "a100"}}: {node_selector!r}')
    return {
        "container_config": {
            # an extended resource is requested by its limit; CPU/memory: model loading and data decoding
            "resources": {"limits": {GPU_RESOURCE: 1}, "requests": {"cpu": "4", "memory": "32Gi"}},
        },
        "pod_spec_config": {
            "node_selector": node_selector,
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


GPU_OP_TAGS: dict[str, Any] = {K8S_CONFIG_TAG: gpu_step_k8s_config()}


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


def executor_from_env(env: Mapping[str, str] = os.environ) -> dg.ExecutorDefinition:
    """The executor ``FC_PIPELINE_EXECUTOR`` names: ``in_process`` (default), ``multiprocess`` or ``k8s``."""
    kind = env.get(EXECUTOR_ENV) or "in_process"
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "multiprocess":
        return dg.multiprocess_executor
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor  # only a cluster deployment needs the kubernetes client

        return k8s_job_executor.configured(k8s_executor_config(env), name="k8s")
    raise ValueError(f"{EXECUTOR_ENV} must be in_process, multiprocess or k8s, not {kind!r}")
