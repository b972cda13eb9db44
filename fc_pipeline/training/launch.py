"""How a training run is started: one process, ``accelerate launch`` on one machine, or many machines.

:func:`training_command` is the command line of one machine's launcher (``python -m fc_pipeline.training.train``
for a single process, else ``accelerate launch`` or ``torchrun``, both of which start
``torch.distributed.run`` underneath); :func:`launch_settings_from_env` reads a machine's place in a
multi-node run from its environment (a Kubernetes Indexed Job gives each pod ``JOB_COMPLETION_INDEX``),
and ``python -m fc_pipeline.training.launch --config cfg.json`` starts the launcher a pod's environment asks
for (the worker pods of a multi-node run, docs/deploy-k8s.md).
"""

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRAIN_MODULE = "fc_pipeline.training.train"
LAUNCHERS = ("auto", "accelerate", "torchrun")
DEFAULT_PORT = 29500


def _validate(
    num_processes: int,
    num_machines: int,
    machine_rank: int,
    main_process_ip: str | None,
    main_process_port: int,
    launcher: str,
) -> None:
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, not {launcher!r}")
    if num_machines < 1:
        raise ValueError(f"num_machines must be at least 1, not {num_machines}")
    if num_processes < num_machines or num_processes % num_machines:
        raise ValueError(
            "num_processes is the total over all machines: "
            f"a positive multiple of num_machines={num_machines}, not {num_processes}"
        )
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"machine_rank must be in [0, {num_machines}), not {machine_rank}")
    if num_machines > 1 and not main_process_ip:
        raise ValueError("several machines need main_process_ip: the address of the machine of rank 0")
    if not 0 < main_process_port < 65536:
        raise ValueError(f"main_process_port must be a TCP port, not {main_process_port}")


def training_command(
    config_path: str | Path,
    *,
    num_processes: int = 1,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int = DEFAULT_PORT,
    launcher: str = "auto",
) -> list[str]:
    """The command that starts this machine's share of a training run of ``config_path``.

    ``num_processes`` counts processes on all machines together (``accelerate launch``'s meaning; each
    machine runs ``num_processes // num_machines``). ``launcher="auto"`` runs one process on one machine
    directly and anything else with ``accelerate launch``; ``"accelerate"`` and ``"torchrun"`` force one.
    Every machine runs the same command except ``machine_rank``; ``main_process_ip`` is the address of
    the machine of rank 0, which listens on ``main_process_port``.
    """
    _validate(num_processes, num_machines, machine_rank, main_process_ip, main_process_port, launcher)
    script = ["-m", TRAIN_MODULE, "--config", str(config_path)]
    if launcher == "auto" and num_processes == 1:
        return [sys.executable, *script]
    multi_node = ["--machine_rank", str(machine_rank), "--main_process_ip", main_process_ip] if num_machines > 1 else []
    if launcher == "torchrun":
        rendezvous = ["--master_addr", main_process_ip] if num_machines > 1 else []
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(num_machines),
            "--node_rank",
            str(machine_rank),
            "--nproc_per_node",
            str(num_processes // num_machines),
            *rendezvous,
            "--master_port",
            str(main_process_port),
            *script,
        ]
    # --multi_gpu: accelerate only guesses it from the GPUs of the local machine, so one GPU per
    # machine would otherwise start a single, non-distributed process on each.
    distributed = ["--multi_gpu"] if num_processes > 1 else []
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *distributed,
        "--num_processes",
        str(num_processes),
        "--num_machines",
        str(num_machines),
        *multi_node,
        "--main_process_port",
        str(main_process_port),
        *script,
    ]


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    """The first of ``names`` set in ``env``, as an int (a clear error names the variable)."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name} must be an integer, not {value!r}") from None
    return default


def launch_settings_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of :func:`training_command` for the machine whose environment is ``env``.

    * ``FC_PIPELINE_NUM_MACHINES`` (1) and ``FC_PIPELINE_PROCESSES_PER_MACHINE`` (1, e.g. GPUs per node);
    * the machine's rank: ``FC_PIPELINE_MACHINE_RANK``, else ``JOB_COMPLETION_INDEX`` (set by a
      Kubernetes Indexed Job), plus ``FC_PIPELINE_MACHINE_RANK_OFFSET`` (1 when rank 0 is elsewhere,
      e.g. the Dagster step pod);
    * ``FC_PIPELINE_MAIN_PROCESS_IP`` / ``FC_PIPELINE_MAIN_PROCESS_PORT``, else ``MASTER_ADDR`` /
      ``MASTER_PORT`` (torch's names), port 29500 by default;
    * ``FC_PIPELINE_LAUNCHER``: auto, accelerate or torchrun.
    """
    num_machines = _int(env, "FC_PIPELINE_NUM_MACHINES", default=1)
    per_machine = _int(env, "FC_PIPELINE_PROCESSES_PER_MACHINE", default=1)
    if per_machine < 1:
        raise ValueError(f"FC_PIPELINE_PROCESSES_PER_MACHINE must be at least 1, not {per_machine}")
    rank = _int(env, "FC_PIPELINE_MACHINE_RANK", "JOB_COMPLETION_INDEX", default=0)
    return {
        "num_processes": per_machine * num_machines,
        "num_machines": num_machines,
        "machine_rank": rank + _int(env, "FC_PIPELINE_MACHINE_RANK_OFFSET", default=0),
        "main_process_ip": env.get("FC_PIPELINE_MAIN_PROCESS_IP") or env.get("MASTER_ADDR") or None,
        "main_process_port": _int(env, "FC_PIPELINE_MAIN_PROCESS_PORT", "MASTER_PORT", default=DEFAULT_PORT),
        "launcher": env.get("FC_PIPELINE_LAUNCHER") or "auto",
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m fc_pipeline.training.launch --config cfg.json``: start this machine's launcher
    (settings from the environment)."""
    parser = argparse.ArgumentParser(prog="fc_pipeline.training.launch", description=main.__doc__)
    parser.add_argument("--config", required=True, help="the run's train_config.json (the same file on every machine)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args = parser.parse_args(argv)
    command = training_command(args.config, **launch_settings_from_env(os.environ))
    if args.dry_run:
        print(shlex.join(command))
        return 0
    os.execv(command[0], command)  # the launcher's exit status becomes the pod's


if __name__ == "__main__":
    sys.exit(main())
