"""The launch command of a training run: one process, several, several machines (fc_pipeline.training.launch)."""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed.run as torchrun
from accelerate.commands.launch import launch_command_parser

from fc_pipeline.training.launch import launch_settings_from_env, main, training_command

PY = sys.executable
ACCELERATE = [PY, "-m", "accelerate.commands.launch"]
SCRIPT = ["-m", "fc_pipeline.training.train", "--config", "/data/run/train_config.json"]
CONFIG = "/data/run/train_config.json"


def test_one_process_runs_the_training_module_directly():
    assert training_command(CONFIG) == [PY, *SCRIPT]


def test_several_processes_on_one_machine_use_accelerate_launch():
    assert training_command(CONFIG, num_processes=8) == [
        *ACCELERATE,
        "--multi_gpu",
        "--num_processes",
        "8",
        "--num_machines",
        "1",
        "--main_process_port",
        "29500",
        *SCRIPT,
    ]


def test_every_machine_gets_the_total_process_count_and_its_rank():
    ranks = [
        training_command(
            CONFIG,
            num_processes=16,
            num_machines=2,
            machine_rank=rank,
            main_process_ip="10.0.0.5",
            main_process_port=29600,
        )
        for rank in (0, 1)
    ]
    assert ranks[1] == [
        *ACCELERATE,
        "--multi_gpu",
        "--num_processes",
        "16",
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.0.0.5",
        "--main_process_port",
        "29600",
        *SCRIPT,
    ]
    assert [a for a in ranks[0] if a != "0"] == [a for a in ranks[1] if a != "1"]  # only the rank differs
    # one GPU per machine: still distributed (accelerate guesses --multi_gpu only from local GPUs)
    assert "--multi_gpu" in training_command(
        CONFIG, num_processes=2, num_machines=2, machine_rank=0, main_process_ip="h"
    )


def test_accelerate_launcher_with_one_process_is_not_multi_gpu():
    assert training_command(CONFIG, launcher="accelerate") == [
        *ACCELERATE,
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--main_process_port",
        "29500",
        *SCRIPT,
    ]


def test_torchrun_equivalent():
    assert training_command(CONFIG, num_processes=4, launcher="torchrun") == [
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--node_rank",
        "0",
        "--nproc_per_node",
        "4",
        "--master_port",
        "29500",
        *SCRIPT,
    ]
    assert training_command(
        CONFIG, num_processes=16, num_machines=2, machine_rank=1, main_process_ip="train-0.train", launcher="torchrun"
    ) == [
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node_rank",
        "1",
        "--nproc_per_node",
        "8",
        "--master_addr",
        "train-0.train",
        "--master_port",
        "29500",
        *SCRIPT,
    ]


def test_the_launchers_parse_the_commands_as_meant():
    """The flags are the installed accelerate's and torch's own: their parsers read what we mean."""
    command = training_command(CONFIG, num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.5")
    args = launch_command_parser().parse_args(command[3:])
    assert (args.multi_gpu, args.num_processes, args.num_machines, args.machine_rank) == (True, 16, 2, 1)
    assert (args.main_process_ip, args.main_process_port) == ("10.0.0.5", 29500)
    assert (args.module, args.training_script, args.training_script_args) == (
        True,
        "fc_pipeline.training.train",
        ["--config", CONFIG],
    )

    command = training_command(
        CONFIG, num_processes=16, num_machines=2, machine_rank=1, main_process_ip="h", launcher="torchrun"
    )
    args = torchrun.get_args_parser().parse_args(command[3:])
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.master_addr, args.master_port) == (
        "2",
        1,
        "8",
        "h",
        29500,
    )
    assert (args.module, args.training_script, args.training_script_args) == (
        True,
        "fc_pipeline.training.train",
        ["--config", CONFIG],
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_machines": 2, "num_processes": 2}, "main_process_ip"),
        ({"num_machines": 2, "num_processes": 3, "main_process_ip": "h"}, "multiple of num_machines"),
        ({"num_machines": 4, "num_processes": 2, "main_process_ip": "h"}, "multiple of num_machines"),
        ({"num_processes": 0}, "multiple of num_machines"),
        ({"num_machines": 0}, "num_machines must be at least 1"),
        (
            {"num_machines": 2, "num_processes": 2, "machine_rank": 2, "main_process_ip": "h"},
            r"machine_rank must be in \[0, 2\)",
        ),
        ({"machine_rank": -1}, "machine_rank"),
        ({"main_process_port": 70000}, "TCP port"),
        ({"launcher": "mpirun"}, "launcher must be one of"),
    ],
)
def test_inconsistent_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        training_command(CONFIG, **settings)


def test_settings_of_an_indexed_job_pod():
    """Rank 0 is the Dagster step pod; pod i of the workers' Indexed Job is machine i + 1."""
    env = {
        "FC_PIPELINE_NUM_MACHINES": "4",
        "FC_PIPELINE_PROCESSES_PER_MACHINE": "8",
        "JOB_COMPLETION_INDEX": "2",
        "FC_PIPELINE_MACHINE_RANK_OFFSET": "1",
        "FC_PIPELINE_MAIN_PROCESS_IP": "10.1.2.3",
    }
    settings = launch_settings_from_env(env)
    assert settings == {
        "num_processes": 32,
        "num_machines": 4,
        "machine_rank": 3,
        "main_process_ip": "10.1.2.3",
        "main_process_port": 29500,
        "launcher": "auto",
    }
    assert training_command(CONFIG, **settings)[3:13] == [
        "--multi_gpu",
        "--num_processes",
        "32",
        "--num_machines",
        "4",
        "--machine_rank",
        "3",
        "--main_process_ip",
        "10.1.2.3",
        "--main_process_port",
    ]


def test_settings_fall_back_to_torch_names_and_defaults():
    assert launch_settings_from_env({}) == {
        "num_processes": 1,
        "num_machines": 1,
        "machine_rank": 0,
        "main_process_ip": None,
        "main_process_port": 29500,
        "launcher": "auto",
    }
    env = {
        "FC_PIPELINE_NUM_MACHINES": "2",
        "FC_PIPELINE_MACHINE_RANK": "1",
        "MASTER_ADDR": "master",
        "MASTER_PORT": "1234",
        "JOB_COMPLETION_INDEX": "0",
        "FC_PIPELINE_LAUNCHER": "torchrun",
    }
    settings = launch_settings_from_env(env)
    assert (
        settings["machine_rank"],
        settings["main_process_ip"],
        settings["main_process_port"],
        settings["launcher"],
    ) == (
        1,
        "master",
        1234,
        "torchrun",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FC_PIPELINE_NUM_MACHINES": "two"}, "FC_PIPELINE_NUM_MACHINES must be an integer, not 'two'"),
        ({"JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX must be an integer"),
        ({"FC_PIPELINE_PROCESSES_PER_MACHINE": "0"}, "FC_PIPELINE_PROCESSES_PER_MACHINE must be at least 1"),
    ],
)
def test_bad_environment_names_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        launch_settings_from_env(env)


def test_cli_prints_the_command_of_its_environment(monkeypatch, capsys):
    for name in [
        n
        for n in os.environ
        if n.startswith("FC_PIPELINE_") or n in ("JOB_COMPLETION_INDEX", "MASTER_ADDR", "MASTER_PORT")
    ]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FC_PIPELINE_NUM_MACHINES", "2")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    monkeypatch.setenv("FC_PIPELINE_MACHINE_RANK_OFFSET", "1")
    monkeypatch.setenv("FC_PIPELINE_MAIN_PROCESS_IP", "10.1.2.3")
    assert main(["--config", CONFIG, "--dry-run"]) == 0
    assert shlex.split(capsys.readouterr().out) == training_command(
        CONFIG, num_processes=2, num_machines=2, machine_rank=1, main_process_ip="10.1.2.3"
    )


PROBE = """
import json, torch
from accelerate import Accelerator
accelerator = Accelerator()
total = accelerator.reduce(torch.tensor([float(accelerator.process_index + 1)]), reduction="sum")
result = {"rank": accelerator.process_index, "world": accelerator.num_processes, "sum": total.item()}
print(json.dumps(result), flush=True)
# leave the group as training does: a process that exits with gloo threads alive may abort (SIGABRT)
accelerator.wait_for_everyone()
accelerator.end_training()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _side_by_side(commands: list[tuple[list[str], dict]], timeout: float) -> list[tuple[str, str]]:
    """Start every ``(command, env)`` at once (as the machines of one run), wait for all, assert they
    succeeded; their ``(stdout, stderr)``."""
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        for command, env in commands
    ]
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 9)
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-4000:]
    return outputs


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_machines_form_one_process_group(tmp_path, launcher):
    """Rank 0 as the training asset builds it, rank 1 from an Indexed Job pod's environment: started
    side by side on this host (gloo on CPU), they rendezvous into one group of two processes."""
    (tmp_path / "probe.py").write_text(PROBE)
    port = _free_port()
    main_rank = training_command(
        CONFIG, num_processes=2, num_machines=2, main_process_ip="127.0.0.1", main_process_port=port, launcher=launcher
    )
    worker_env = {
        "FC_PIPELINE_NUM_MACHINES": "2",
        "JOB_COMPLETION_INDEX": "0",
        "FC_PIPELINE_MACHINE_RANK_OFFSET": "1",
        "FC_PIPELINE_MAIN_PROCESS_IP": "127.0.0.1",
        "FC_PIPELINE_MAIN_PROCESS_PORT": str(port),
        "FC_PIPELINE_LAUNCHER": launcher,
    }
    worker = training_command(CONFIG, **launch_settings_from_env(worker_env))
    assert main_rank[-len(SCRIPT) :] == worker[-len(SCRIPT) :] == SCRIPT
    # the same launchers, with the probe in place of the training module
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    outputs = _side_by_side(
        [([*command[: -len(SCRIPT)], "-m", "probe"], env) for command in (main_rank, worker)], timeout=120
    )
    reports = [json.loads(line) for out, _ in outputs for line in out.splitlines() if line.startswith("{")]
    reports.sort(key=lambda report: report["rank"])
    assert reports == [{"rank": 0, "world": 2, "sum": 3.0}, {"rank": 1, "world": 2, "sum": 3.0}]


@pytest.mark.slow
def test_two_machines_train_one_model(synthetic_shards, tmp_path):
    """The real thing on one host: machine 0 runs the command the training asset builds, machine 1 runs
    ``python -m fc_pipeline.training.launch`` with the environment of a worker pod; DDP over gloo trains two steps
    and only rank 0 reports."""
    import dataclasses

    from fc_pipeline.training.train import TrainConfig

    config = TrainConfig.tiny(
        str(synthetic_shards),
        str(tmp_path / "run"),
        resolution=32,
        train_batch_size=2,
        max_steps=2,
        checkpoint_every=2,
        progress=False,
    )
    config_path = tmp_path / "train_config.json"
    config_path.write_text(json.dumps(dataclasses.asdict(config)))
    port = _free_port()
    main_rank = training_command(
        config_path, num_processes=2, num_machines=2, main_process_ip="127.0.0.1", main_process_port=port
    )
    worker_env = {
        "FC_PIPELINE_NUM_MACHINES": "2",
        "JOB_COMPLETION_INDEX": "0",
        "FC_PIPELINE_MACHINE_RANK_OFFSET": "1",
        "FC_PIPELINE_MAIN_PROCESS_IP": "127.0.0.1",
        "FC_PIPELINE_MAIN_PROCESS_PORT": str(port),
    }
    worker = [sys.executable, "-m", "fc_pipeline.training.launch", "--config", str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    outputs = _side_by_side([(main_rank, env), (worker, {**env, **worker_env})], timeout=400)
    summary = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert summary["steps"] == 2 and Path(summary["checkpoint"]).is_dir()
    assert outputs[1][0].strip() == ""  # rank 1 trains but does not report
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
