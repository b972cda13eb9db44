"""End to end through subprocesses on temporary Dagster instances: `fc-pipeline demo`, and the
README's command-line materialisations and backfills (one corpus, a list, all, the failed ones)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from fc_pipeline.data.demo_corpus import make_demo_corpus

from .test_definitions import DATASET

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = 8  # demo corpus size that passes every dataset check


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`fc-pipeline demo` of the dataset chain on the default 24-image demo corpus."""
    tmp = tmp_path_factory.mktemp("demo")
    data, home = tmp / "data", tmp / "home"
    command = [
        str(BIN / "fc-pipeline"),
        "demo",
        "--data-root",
        str(data),
        "--dagster-home",
        str(home),
        "--select",
        *DATASET,
    ]
    done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300)
    return data, home, done


def test_demo_prints_the_shards_and_a_summary(demo):
    data, home, done = demo
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"shards: {data / 'datasets' / 'demo' / 'shards'}" in done.stdout
    assert "images in: 24" in done.stdout
    assert "failures by reason:" in done.stdout and '"truncated": 1' in done.stdout
    assert (data / "datasets" / "demo" / "shards" / "train" / "00000.tar").is_file()


def test_demo_run_is_recorded_in_the_instance(demo, monkeypatch):
    data, home, done = demo
    assert (home / "dagster.yaml").read_text() == (REPO_ROOT / "dagster.yaml").read_text()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS and run.tags["dagster/partition"] == "demo"
        assert instance.get_dynamic_partitions("corpus") == ["demo"]
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count >= 1
        event = instance.get_latest_materialization_event(dg.AssetKey("training_shards"))
        assert event.asset_materialization.metadata["images_in"].value == 24


class Instance:
    """A fresh DAGSTER_HOME (the repo's dagster.yaml) and data root, driven by the installed CLIs."""

    def __init__(self, tmp_path: Path):
        self.home, self.data = tmp_path / "dagster_home", tmp_path / "data"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "FC_PIPELINE_DATA": str(self.data),
            "OMP_NUM_THREADS": "1",
        }

    def run(self, *command: str, timeout: int = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(command, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done

    def runs(self) -> list:
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            return list(instance.get_runs())

    def wait_for_runs(self, count: int, timeout: float = 240) -> dict[str, str]:
        """Wait until ``count`` runs ended; ``{partition: status}`` of the newest run per partition."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.runs()
            if len(runs) >= count and all(r.is_finished for r in runs):
                latest = {}
                for run in sorted(runs, key=lambda r: self._created(r.run_id)):
                    latest[run.tags.get("dagster/partition")] = run.status.value
                return latest
            time.sleep(2)
        raise AssertionError(
            f"runs did not finish: {[(r.tags.get('dagster/partition'), r.status) for r in self.runs()]}"
        )

    def _created(self, run_id: str) -> float:
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            return instance.get_run_record_by_id(run_id).create_timestamp.timestamp()


@pytest.mark.slow
def test_readme_materialize_command_on_a_fresh_dagster_home(demo, tmp_path):
    """Every asset of the code location (training and evaluation included) for the demo corpus;
    the dataset steps find the demo's outputs and report ``cached``."""
    data, _, _ = demo
    instance = Instance(tmp_path)
    instance.env["FC_PIPELINE_DATA"] = str(data)
    instance.run(str(BIN / "fc-pipeline"), "corpus", "add", "demo")
    instance.run(
        str(BIN / "dagster"),
        "asset",
        "materialize",
        "-m",
        "assets",
        "--select",
        "*",
        "--partition",
        "demo",
        timeout=540,
    )
    with dg.DagsterInstance.from_config(str(instance.home)) as dagster:
        (run,) = dagster.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        shards = dagster.get_latest_materialization_event(dg.AssetKey("training_shards")).asset_materialization
        assert shards.metadata["status"].value == "cached"
        materialized = {key.to_user_string() for key in dagster.get_asset_keys()}
    assert set(DATASET) | {"fastcomposer_checkpoint", "evaluation_report"} <= materialized


def _manifest(folder: Path) -> str:
    """A jsonl manifest of a demo corpus folder, with its captions and annotations."""
    lines = []
    for image in sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png") and ".panoptic" not in p.name):
        caption, annotation = image.with_suffix(".txt"), image.with_name(image.stem + ".panoptic.json")
        record = {"path": str(image)}
        record |= {"caption": caption.read_text()} if caption.exists() else {}
        record |= {"annotation": str(annotation)} if annotation.exists() else {}
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)


@pytest.mark.slow
def test_backfills_from_the_command_line(tmp_path):
    """The README's backfill commands: one corpus, a list, the failed ones again, all."""
    instance = Instance(tmp_path)
    corpora = instance.data / "corpora"
    for name in ("alpha", "beta"):
        make_demo_corpus(corpora / name, n=SMALL)
    (corpora / "broken.jsonl").write_text("{not json\n")
    fc, dagster = str(BIN / "fc-pipeline"), str(BIN / "dagster")
    instance.run(fc, "corpus", "add", "alpha", "beta", "broken")
    assert instance.run(fc, "corpus", "list").stdout.strip() == "alpha,beta,broken"
    # the sensor would also build these corpora; the test drives the runs by hand
    instance.run(dagster, "sensor", "stop", "corpus_sensor", "-w", "workspace.yaml")

    # one corpus: a run in this process
    instance.run(dagster, "asset", "materialize", "-m", "assets", "--select", "group:dataset", "--partition", "alpha")
    assert [r.status for r in instance.runs()] == [dg.DagsterRunStatus.SUCCESS]

    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        env=instance.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # a list of corpora: queued runs, started by the daemon
        backfill = [dagster, "job", "backfill", "-m", "assets", "-j", "build_dataset", "--noprompt"]
        instance.run(*backfill, "--partitions", "beta,broken")
        assert instance.wait_for_runs(3) == {"alpha": "SUCCESS", "beta": "SUCCESS", "broken": "FAILURE"}
        assert instance.run(fc, "corpus", "failed").stdout.strip() == "broken"

        # fix the corpus, re-run only the failed ones
        (corpora / "broken.jsonl").write_text(_manifest(make_demo_corpus(instance.data / "uploads", n=SMALL)))
        failed = instance.run(fc, "corpus", "failed").stdout.strip()
        instance.run(*backfill, "--partitions", failed)
        assert instance.wait_for_runs(4)["broken"] == "SUCCESS"
        assert instance.run(fc, "corpus", "failed").stdout.strip() == ""

        # all corpora: everything is cached now
        instance.run(*backfill, "--all", "true")
        statuses = instance.wait_for_runs(7)
        assert set(statuses.values()) == {"SUCCESS"} and set(statuses) == {"alpha", "beta", "broken"}
    finally:
        os.killpg(daemon.pid, 15)
        daemon.wait(timeout=30)
    with dg.DagsterInstance.from_config(str(instance.home)) as dagster_instance:
        records = dagster_instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("captions"), asset_partitions=["alpha"]), limit=10
        ).records
    assert [r.asset_materialization.metadata["status"].value for r in records][:1] == ["cached"]


@pytest.mark.slow
def test_corpus_backfill_fans_out_and_hides_the_chunks(tmp_path):
    """`fc-pipeline corpus backfill NAME --chunks K --workers N`: one run of the corpus partition whose
    per-image steps ran in K chunk steps; a re-run with another K computes nothing."""
    instance = Instance(tmp_path)
    make_demo_corpus(instance.data / "corpora" / "alpha", n=SMALL)
    fc = str(BIN / "fc-pipeline")
    first = instance.run(fc, "corpus", "backfill", "alpha", "--chunks", "2", "--workers", "2", timeout=600)
    assert "alpha: run" in first.stderr and "succeeded" in first.stderr
    assert f"captions: status computed, rows {SMALL}, computed {SMALL}, chunks 2" in first.stderr
    assert "pool of this instance admits 1 step(s)" in first.stderr  # a CPU machine: one gpu slot
    (run,) = instance.runs()
    assert run.tags["dagster/partition"] == "alpha" and run.status == dg.DagsterRunStatus.SUCCESS
    with dg.DagsterInstance.from_config(str(instance.home)) as dagster_instance:
        steps = {e.dagster_event.step_key for e in dagster_instance.all_logs(run.run_id) if e.dagster_event}
        assert dagster_instance.get_dynamic_partitions("corpus") == ["alpha"]  # no chunk partitions
    assert {"captions.captions_chunk[0_of_2]", "captions.captions_chunk[1_of_2]", "captions.captions_merge"} <= steps
    leftovers = [p.name for p in (instance.data / "datasets" / "alpha").glob("*.chunk-*") if not p.name.startswith(".")]
    assert leftovers == []  # merged and removed (only the hidden lock files stay, as for every table)

    again = instance.run(fc, "corpus", "backfill", "alpha", "--chunks", "3", timeout=600)
    for asset in ("corpus_images", "captions", "panoptic_segments", "noun_phrases", "subject_matches"):
        assert f"{asset}: status cached" in again.stderr
    assert "computed 0, chunks 3" in again.stderr


def test_corpus_backfill_refuses_bad_arguments(tmp_path):
    instance = Instance(tmp_path)
    fc = str(BIN / "fc-pipeline")
    for args, message in [
        (["backfill"], "name at least one corpus"),
        (["backfill", "alpha", "--chunks", "0"], "chunks must be an integer from 1 to 4096"),
        (["backfill", "alpha", "--workers", "0"], "--workers must be at least 1"),
        (["list", "--chunks", "2"], "--chunks and --workers are for backfill"),
    ]:
        done = subprocess.run(
            [fc, "corpus", *args], cwd=REPO_ROOT, env=instance.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr[-2000:])
