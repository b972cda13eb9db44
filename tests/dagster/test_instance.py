"""`fc-pipeline instance` / `fc-pipeline corpus`: the instance dir, the gpu pool, corpus registration."""

from pathlib import Path

import dagster as dg
import pytest

from assets.instance import prepare_dagster_home, register_corpora, registered_corpora
from fc_pipeline.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def _gpu_slots(home: Path) -> int:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return instance.event_log_storage.get_concurrency_info("gpu").slot_count


def test_instance_dir_gets_the_repo_config_and_a_gpu_pool_sized_to_the_gpus(tmp_path):
    import torch

    home = prepare_dagster_home(tmp_path / "home")
    assert (home / "dagster.yaml").read_text() == (REPO_ROOT / "dagster.yaml").read_text()
    assert _gpu_slots(home) == max(1, torch.cuda.device_count())


def test_instance_keeps_a_users_config_and_pool_limit(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text() + "\n# mine\n")
    prepare_dagster_home(home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 8)
    prepare_dagster_home(home)
    assert (home / "dagster.yaml").read_text().endswith("# mine\n")
    assert _gpu_slots(home) == 8


def test_corpus_registration_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["corpus", "add", "street", "faces", "street"]) == 0
    assert "registered: street, faces" in capsys.readouterr().err
    assert main(["corpus", "add", "street"]) == 0
    assert "nothing new" in capsys.readouterr().err
    assert main(["corpus", "list"]) == 0
    assert capsys.readouterr().out.strip() == "street,faces"
    assert main(["corpus", "failed"]) == 0
    assert capsys.readouterr().out.strip() == ""  # nothing was built, so nothing failed
    with pytest.raises(SystemExit, match="invalid corpus names"):
        main(["corpus", "add", "../etc"])
    with pytest.raises(SystemExit, match="name at least one corpus"):
        main(["corpus", "add"])
    assert registered_corpora() == ["street", "faces"]


def test_register_corpora_returns_only_new_names(tmp_path):
    home = tmp_path / "home"
    assert register_corpora(["a", "b"], home) == ["a", "b"]
    assert register_corpora(["b", "c"], home) == ["c"]
    assert registered_corpora(home) == ["a", "b", "c"]
