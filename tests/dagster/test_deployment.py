"""The many-machines deployment: executor choice, GPU step pods, instance and helm values, training workers.

Nothing here needs a cluster: Dagster's and dagster-k8s's own schemas and builders check the config,
and a fake Kubernetes API stands in for the cluster where the training workers are created.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)
from dagster_k8s.models import k8s_snake_case_dict
from kubernetes import client

import assets
from assets.deployment import (
    DEFAULT_GPU_NODE_SELECTOR,
    DEFAULT_STEP_K8S_CONFIG,
    GPU_OP_TAGS,
    MULTIPROCESS_EXECUTOR,
    TRAINING_OP_TAGS,
    executor_from_env,
    gpu_step_k8s_config,
    k8s_executor_config,
    training_workers,
)
from assets.resources import default_chunks
from fc_pipeline.training.launch import launch_settings_from_env, training_command

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy" / "k8s"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
K8S_ENV = {"FC_PIPELINE_EXECUTOR": "k8s"}


def _job_with(executor: dg.ExecutorDefinition) -> dg.JobDefinition:
    @dg.asset(op_tags=GPU_OP_TAGS)
    def probe() -> None: ...

    return dg.Definitions(assets=[probe], executor=executor).resolve_implicit_global_asset_job_def()


# --- executor -----------------------------------------------------------------------------------
def test_default_executor_is_one_process_per_run():
    assert executor_from_env({}) is dg.in_process_executor
    assert executor_from_env({"FC_PIPELINE_EXECUTOR": "in_process"}) is dg.in_process_executor
    assert executor_from_env({"FC_PIPELINE_EXECUTOR": "multiprocess"}) is MULTIPROCESS_EXECUTOR
    with pytest.raises(ValueError, match="in_process, multiprocess or k8s, not 'celery'"):
        executor_from_env({"FC_PIPELINE_EXECUTOR": "celery"})


def test_k8s_executor_config_from_env_passes_dagster_k8s_schema():
    env = {
        **K8S_ENV,
        "FC_PIPELINE_K8S_NAMESPACE": "fc-pipeline",
        "FC_PIPELINE_K8S_IMAGE_PULL_POLICY": "Always",
        "FC_PIPELINE_K8S_MAX_CONCURRENT": "3",
        "FC_PIPELINE_K8S_ENV_CONFIG_MAPS": "fc-pipeline-env, hf-settings",
        "FC_PIPELINE_K8S_ENV_SECRETS": "hf-token",
    }
    executor = executor_from_env(env)
    assert executor.name == "k8s"
    job = _job_with(executor)
    assert job.executor_def.name == "k8s"
    result = dg.validate_run_config(job, {})  # the executor's config goes through dagster-k8s's schema here
    execution = result["execution"]["k8s"]
    assert execution["job_namespace"] == "fc-pipeline"
    assert execution["image_pull_policy"] == "Always"
    assert execution["max_concurrent"] == 3
    assert execution["env_config_maps"] == ["fc-pipeline-env", "hf-settings"]
    assert execution["env_secrets"] == ["hf-token"]
    assert execution["step_k8s_config"]["container_config"]["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}
    assert k8s_executor_config({}) == {
        "image_pull_policy": "IfNotPresent",
        "max_concurrent": 8,
        "step_k8s_config": DEFAULT_STEP_K8S_CONFIG,
    }


def test_a_wrong_step_config_is_refused_by_dagster():
    executor = executor_from_env({**K8S_ENV, "FC_PIPELINE_K8S_STEP_CONFIG": '{"container": {"resources": {}}}'})
    with pytest.raises(dg.DagsterInvalidConfigError, match='unexpected config entry "container"'):
        dg.validate_run_config(_job_with(executor), {})
    with pytest.raises(ValueError, match="FC_PIPELINE_K8S_STEP_CONFIG must be JSON"):
        k8s_executor_config({"FC_PIPELINE_K8S_STEP_CONFIG": "{resources"})


def test_code_location_loads_with_the_k8s_executor_without_a_cluster(tmp_path):
    """A fresh interpreter with FC_PIPELINE_EXECUTOR=k8s and no kubeconfig: every job of the code location
    runs on the k8s executor and its config passes dagster-k8s's schema."""
    script = """
import json, dagster as dg, assets
jobs = assets.defs.resolve_all_job_defs()
for job in jobs:
    dg.validate_run_config(job, {})
print(json.dumps({job.name: job.executor_def.name for job in jobs}))
"""
    env = {
        **os.environ,
        **K8S_ENV,
        "KUBECONFIG": str(tmp_path / "missing"),
        "DAGSTER_HOME": str(tmp_path),
        "FC_PIPELINE_DATA": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    executors = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"build_dataset", "__ASSET_JOB"} <= set(executors)
    assert set(executors.values()) == {"k8s"}


# --- GPU steps ----------------------------------------------------------------------------------
def test_every_gpu_pool_step_asks_for_a_gpu_node():
    tagged, untagged = {}, set()
    for definition in assets.defs.assets:
        if not isinstance(definition, dg.AssetsDefinition):
            continue
        for op in definition.node_def.iterate_op_defs():  # a chunked asset's ops, or the asset's one op
            k8s = get_user_defined_k8s_config(op.tags)
            if op.pool == "gpu":
                tagged[op.name] = k8s
            else:
                assert k8s == UserDefinedDagsterK8sConfig(), (
                    f"{op.name} is not in the gpu pool but asks for k8s resources"
                )
                untagged.add(op.name)
    assert {
        "captions_chunk",
        "panoptic_segments_chunk",
        "subject_matches_chunk",
        "fastcomposer_checkpoint",
        "evaluation_report",
    } <= set(tagged)
    assert {"corpus_images_chunk", "noun_phrases_chunk", "captions_merge", "training_shards"} <= untagged
    for name, k8s in tagged.items():
        assert int(k8s.container_config["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        assert k8s.pod_spec_config["node_selector"] == DEFAULT_GPU_NODE_SELECTOR, name
        assert k8s.pod_spec_config["tolerations"] == [GPU_TOLERATION], name


def test_gpu_node_selector_and_gpu_count_are_configurable():
    config = gpu_step_k8s_config(
        {"FC_PIPELINE_GPU_NODE_SELECTOR": '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}'}, gpus=8
    )
    assert config["pod_spec_config"]["node_selector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert config["container_config"]["resources"] == {
        "limits": {"nvidia.com/gpu": "8"},
        "requests": {"cpu": "32", "memory": "256Gi"},
    }
    assert TRAINING_OP_TAGS == GPU_OP_TAGS  # FC_PIPELINE_TRAINING_GPUS unset: one GPU per training machine
    with pytest.raises(ValueError, match="FC_PIPELINE_GPU_NODE_SELECTOR must be a JSON object of strings"):
        gpu_step_k8s_config({"FC_PIPELINE_GPU_NODE_SELECTOR": '["gpu"]'})


def _processed(config_type, value: dict) -> dict:
    """``value`` checked against a Dagster config schema, defaults and env sources resolved as Dagster
    does (through a probe op and ``dg.validate_run_config``, which raises when it is invalid)."""

    @dg.op(config_schema=config_type, name="probe")
    def probe(): ...

    @dg.job
    def check():
        probe()

    return dg.validate_run_config(check, {"ops": {"probe": {"config": value}}})["ops"]["probe"]["config"]


def _launcher_config(monkeypatch) -> dict:
    """The run launcher config of deploy/k8s/dagster.yaml, env sources resolved as Dagster does."""
    monkeypatch.setenv("DAGSTER_K8S_NAMESPACE", "fc-pipeline")
    monkeypatch.setenv("FC_PIPELINE_IMAGE", "registry.example.com/fc-pipeline:0.1.0")
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    return _processed(K8sRunLauncher.config_type(), instance["run_launcher"]["config"])


def step_job(launcher: dict, tags: dict, step: str) -> client.V1Job:
    """The Kubernetes Job of a step as the k8s executor builds it (run launcher < executor < op tags; the
    container contexts fold pull policy, env and volumes into their ``run_k8s_config``)."""
    context = (
        K8sContainerContext(
            image_pull_policy=launcher["image_pull_policy"],
            env_config_maps=launcher["env_config_maps"],
            volumes=launcher["volumes"],
            volume_mounts=launcher["volume_mounts"],
            namespace=launcher["job_namespace"],
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(launcher["run_k8s_config"]),
        )
        .merge(
            K8sContainerContext(
                run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(k8s_executor_config({})["step_k8s_config"])
            )
        )
        .merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    )
    job_config = DagsterK8sJobConfig(
        job_image=launcher["job_image"],
        dagster_home=launcher["dagster_home"],
        instance_config_map=launcher["instance_config_map"],
        postgres_password_secret=launcher["postgres_password_secret"],
    )
    return construct_dagster_k8s_job(
        job_config,
        ["dagster", "api", "execute_step"],
        f"dagster-step-{step}",
        user_defined_k8s_config=context.run_k8s_config,
        component="step_worker",
        labels={"dagster/op": step, "dagster/run-id": "run-1"},
    )


def op_tags(asset: str, op: str) -> dict:
    """The tags of one op of an asset (a chunked asset is a graph of ops)."""
    (found,) = [o for o in assets.defs.resolve_assets_def(asset).node_def.iterate_op_defs() if o.name == op]
    return dict(found.tags)


def test_step_pods_of_gpu_and_cpu_steps(monkeypatch):
    launcher = _launcher_config(monkeypatch)
    gpu_pod = step_job(launcher, op_tags("captions", "captions_chunk"), "captions").spec.template.spec
    (container,) = gpu_pod.containers
    assert container.resources.limits == {"nvidia.com/gpu": "1", "memory": "2Gi"}
    assert container.resources.requests == {"cpu": "4", "memory": "32Gi"}  # the GPU tag wins over the step default
    assert gpu_pod.node_selector == DEFAULT_GPU_NODE_SELECTOR
    assert [t.to_dict() for t in gpu_pod.tolerations] == [{**GPU_TOLERATION, "toleration_seconds": None, "value": None}]
    assert [v.persistent_volume_claim.claim_name for v in gpu_pod.volumes] == ["fc-pipeline-data"]
    assert [(m.name, m.mount_path) for m in container.volume_mounts] == [("fc-pipeline-data", "/data")]
    assert [e.config_map_ref.name for e in container.env_from] == ["fc-pipeline-env"]
    assert container.image == "registry.example.com/fc-pipeline:0.1.0"

    cpu_pod = step_job(launcher, op_tags("noun_phrases", "noun_phrases_chunk"), "noun_phrases").spec.template.spec
    resources = cpu_pod.containers[0].resources
    assert (resources.limits, resources.requests) == ({"memory": "2Gi"}, {"cpu": "1", "memory": "4Gi"})
    assert cpu_pod.node_selector is None and cpu_pod.tolerations is None


# --- instance and helm values --------------------------------------------------------------------
def test_instance_yaml_is_valid_for_dagster_and_dagster_k8s(tmp_path, monkeypatch):
    config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    # Dagster's instance schema checks every section but the cluster-only ones (raises when invalid;
    # the storage needs dagster-postgres, the launcher a cluster: its own schema checks it below, and
    # only a resuming launcher like it may resume runs)
    sections = {k: v for k, v in config.items() if k not in ("storage", "run_launcher")}
    sections["run_monitoring"] = {**sections["run_monitoring"], "max_resume_run_attempts": 0}
    with dg.instance_for_test(overrides=sections):
        pass
    assert list(config["storage"]) == ["postgres"]
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert config["storage"]["postgres"]["postgres_db"]["port"] == 5432
    assert (config["run_launcher"]["module"], config["run_launcher"]["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert _launcher_config(monkeypatch)["load_incluster_config"] is True


KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: nobody, user: {token: none}}]
contexts: [{name: outside, context: {cluster: nowhere, user: nobody}}]
current-context: outside
"""


def test_instance_yaml_builds_launcher_queue_pools_monitoring_and_retries(tmp_path, monkeypatch):
    """The instance built for real, but for SQLite in place of Postgres and a kubeconfig in place of the
    in-cluster config (nothing is contacted)."""
    _launcher_config(monkeypatch)  # sets the launcher's env
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    del instance["storage"]
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    instance["run_launcher"]["config"].update(load_incluster_config=False, kubeconfig_file=str(tmp_path / "kubeconfig"))
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    with dg.DagsterInstance.from_config(str(tmp_path)) as local:
        launcher = local.run_launcher
        assert isinstance(launcher, K8sRunLauncher) and launcher.supports_resume_run
        assert (launcher.job_namespace, launcher.job_image) == ("fc-pipeline", "registry.example.com/fc-pipeline:0.1.0")
        concurrency = local.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 16
        assert concurrency.pool_config.default_pool_limit == 1
        assert type(local.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert local.run_monitoring_enabled and local.run_monitoring_start_timeout_seconds == 600
        assert local.run_monitoring_max_resume_run_attempts == 2
        assert local.run_retries_enabled and local.run_retries_max_retries == 2
        assert not local.run_retries_retry_on_asset_or_op_failure
        assert not local.telemetry_enabled


def _snake(value):
    """camelCase helm keys -> the snake_case keys of dagster.yaml (applyLimitPerUniqueValue is Dagster's own)."""
    if isinstance(value, dict):
        return {
            key
            if key == "applyLimitPerUniqueValue"
            else "".join(f"_{c.lower()}" if c.isupper() else c for c in key): _snake(v)
            for key, v in value.items()
        }
    return [_snake(v) for v in value] if isinstance(value, list) else value


def test_helm_values_run_the_code_location_and_match_the_instance_yaml():
    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["codeServerArgs"] == ["-m", "assets"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["FC_PIPELINE_EXECUTOR"] == "k8s"
    assert executor_from_env(env).name == "k8s" and gpu_step_k8s_config(env) == GPU_OP_TAGS["dagster-k8s/config"]
    assert default_chunks(env) == 8  # each per-image dataset step of a corpus on 8 pods
    # the data root is the shared ReadWriteMany claim, mounted at the same path in every pod
    (mount,) = [m for m in deployment["volumeMounts"] if m["mountPath"] == env["FC_PIPELINE_DATA"]]
    (volume,) = [v for v in deployment["volumes"] if v["name"] == mount["name"]]
    claim = yaml.safe_load((DEPLOY / "data-pvc.yaml").read_text())
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert instance["run_launcher"]["config"]["volumes"] == [
        {"name": "fc-pipeline-data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    ]

    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert _snake(launcher["runK8sConfig"]) == instance["run_launcher"]["config"]["run_k8s_config"]
    daemon = values["dagsterDaemon"]
    assert daemon["enabled"]
    assert daemon["runCoordinator"] == {
        "enabled": True,
        "type": "QueuedRunCoordinator",
        "config": {"queuedRunCoordinator": {}},
    }
    assert _snake(daemon["runMonitoring"]) == instance["run_monitoring"]
    assert _snake(daemon["runRetries"]) == instance["run_retries"]
    assert values["concurrency"]["enabled"]
    helm_concurrency = _snake({k: v for k, v in values["concurrency"].items() if k != "enabled"})
    assert helm_concurrency == instance["concurrency"]
    assert values["telemetry"] == instance["telemetry"] == {"enabled": False}
    assert values["global"]["postgresqlSecretName"] == instance["run_launcher"]["config"]["postgres_password_secret"]


# --- multi-node training workers -----------------------------------------------------------------
class FakeCore:
    def __init__(self, pod):
        self.pod, self.reads = pod, []

    def read_namespaced_pod(self, name, namespace):
        self.reads.append((name, namespace))
        return self.pod


class FakeBatch:
    def __init__(self):
        self.created, self.deleted = [], []

    def create_namespaced_job(self, namespace, body):
        self.created.append((namespace, body))

    def delete_namespaced_job(self, name, namespace, propagation_policy):
        self.deleted.append((name, namespace, propagation_policy))


@pytest.fixture
def training_pod(monkeypatch) -> client.V1Pod:
    """The pod of the training step (machine 0) as the k8s executor creates it, as the API returns it."""
    launcher = _launcher_config(monkeypatch)
    tags = dict(assets.defs.resolve_assets_def("fastcomposer_checkpoint").op.tags)
    spec = step_job(launcher, tags, "fastcomposer_checkpoint").spec.template.spec
    spec.node_name = "gpu-node-7"
    spec.volumes.append(
        client.V1Volume(name="kube-api-access-x9z", projected=client.V1ProjectedVolumeSource(sources=[]))
    )
    token_mount = client.V1VolumeMount(
        name="kube-api-access-x9z", mount_path="/var/run/secrets/kubernetes.io/serviceaccount"
    )
    spec.containers[0].volume_mounts.append(token_mount)
    spec.containers[0].env.append(client.V1EnvVar(name="FC_PIPELINE_MACHINE_RANK", value="0"))
    monkeypatch.setattr("dagster_k8s.utils.detect_current_namespace", lambda kubeconfig: "fc-pipeline")
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name="dagster-step-5f0c2e-pod",
            namespace="fc-pipeline",
            uid="uid-1",
            labels={"dagster/run-id": "run-1", "job-name": "dagster-step-5f0c2e", "controller-uid": "c-1"},
        ),
        spec=spec,
        status=client.V1PodStatus(pod_ip="10.4.0.7"),
    )


def test_workers_are_an_indexed_job_cloned_from_the_training_pod(training_pod):
    core, batch, logs = FakeCore(training_pod), FakeBatch(), []
    config_path = "/data/checkpoints/run-1/train_config.json"
    with training_workers(
        config_path,
        num_machines=3,
        processes_per_machine=2,
        main_process_port=29600,
        core_api=core,
        batch_api=batch,
        env={"HOSTNAME": "dagster-step-5f0c2e-pod"},
        log=logs.append,
    ) as main_ip:
        assert main_ip == "10.4.0.7"
        assert core.reads == [("dagster-step-5f0c2e-pod", "fc-pipeline")]
        ((namespace, job),) = batch.created
        assert not batch.deleted
    assert batch.deleted == [(job.metadata.name, "fc-pipeline", "Background")]
    assert namespace == "fc-pipeline" and job.metadata.name in logs[0]

    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism, job.spec.backoff_limit) == (
        "Indexed",
        2,
        2,
        0,
    )
    assert [(o.kind, o.name, o.uid) for o in job.metadata.owner_references] == [
        ("Pod", "dagster-step-5f0c2e-pod", "uid-1")
    ]
    assert (
        job.spec.template.metadata.labels["dagster/run-id"] == "run-1"
        and "controller-uid" not in job.spec.template.metadata.labels
    )
    spec = job.spec.template.spec
    assert spec.node_name is None and spec.restart_policy == "Never" and spec.automount_service_account_token is False
    # the same GPUs, GPU nodes, image and data volume as machine 0; no API token
    assert spec.node_selector == training_pod.spec.node_selector == DEFAULT_GPU_NODE_SELECTOR
    assert spec.tolerations == training_pod.spec.tolerations
    (container,) = spec.containers
    assert container.resources == training_pod.spec.containers[0].resources
    assert container.image == training_pod.spec.containers[0].image
    assert [v.name for v in spec.volumes] == ["fc-pipeline-data"]
    assert [m.mount_path for m in container.volume_mounts] == ["/data"]
    assert (
        container.command == [sys.executable, "-m", "fc_pipeline.training.launch", "--config", config_path]
        and container.args is None
    )
    assert (
        training_pod.spec.node_name == "gpu-node-7" and len(training_pod.spec.volumes) == 2
    )  # the pod itself is untouched

    # pod i of the Job runs machine i + 1 of the very command machine 0 runs
    env = {e.name: e.value for e in container.env if e.value is not None}
    for index in (0, 1):
        worker = training_command(config_path, **launch_settings_from_env({**env, "JOB_COMPLETION_INDEX": str(index)}))
        assert worker == training_command(
            config_path,
            num_processes=6,
            num_machines=3,
            machine_rank=index + 1,
            main_process_ip=main_ip,
            main_process_port=29600,
        )
    # the manifest is one the API server accepts the shape of
    manifest = client.ApiClient().sanitize_for_serialization(job)
    assert manifest["spec"]["completionMode"] == "Indexed"
    assert k8s_snake_case_dict(client.V1Job, manifest)["spec"]["completion_mode"] == "Indexed"


def test_workers_are_deleted_when_training_fails(training_pod):
    batch = FakeBatch()
    with pytest.raises(RuntimeError, match="rendezvous"):
        with training_workers(
            "cfg.json",
            num_machines=2,
            processes_per_machine=1,
            core_api=FakeCore(training_pod),
            batch_api=batch,
            env={"HOSTNAME": "dagster-step-5f0c2e-pod"},
            log=lambda m: None,
        ):
            raise RuntimeError("rendezvous timed out")
    assert len(batch.created) == len(batch.deleted) == 1


def test_one_machine_or_given_workers_create_nothing(monkeypatch):
    class NoApi:
        def __getattr__(self, name):
            raise AssertionError(f"the Kubernetes API was called: {name}")

    with training_workers(
        "cfg.json", num_machines=1, processes_per_machine=8, core_api=NoApi(), batch_api=NoApi()
    ) as ip:
        assert ip is None
    given = {"main_process_ip": "train-0.train", "core_api": NoApi(), "batch_api": NoApi()}
    with training_workers("cfg.json", num_machines=4, processes_per_machine=8, **given) as ip:
        assert ip == "train-0.train"
    monkeypatch.setattr("dagster_k8s.utils.detect_current_namespace", lambda kubeconfig: None)
    with pytest.raises(RuntimeError, match="need either main_process_ip .* or a Kubernetes pod"):
        with training_workers("cfg.json", num_machines=2, processes_per_machine=1, env={}):
            pass
