"""The ``fc-pipeline`` command: build-dataset, train, generate, evaluate, demo.

Each sub-command is one ``_add_<name>`` (arguments) and one ``_run_<name>`` (a call into the
library). Heavy imports happen inside the run functions so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys


# --- demo (owner: Dagster/demo) -------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="materialise the whole Dagster asset chain on the tiny profile")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    raise SystemExit("demo: not implemented yet")


# --- build-dataset (owner: data) ------------------------------------------------------------
def _add_build_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-dataset", help="corpus -> captions -> segments -> phrases -> matches -> shards")
    p.set_defaults(func=_run_build_dataset)


def _run_build_dataset(args: argparse.Namespace) -> int:
    raise SystemExit("build-dataset: not implemented yet")


# --- train (owner: model) -------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a FastComposer checkpoint from webdataset shards")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    raise SystemExit("train: not implemented yet")


# --- generate (owner: pipeline) -------------------------------------------------------------
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images of several subjects, one photo each")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    raise SystemExit("generate: not implemented yet")


# --- evaluate (owner: evaluation) -----------------------------------------------------------
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="identity preservation and prompt consistency of a checkpoint")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    raise SystemExit("evaluate: not implemented yet")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fc-pipeline`` (all sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="fc-pipeline",
        description="FastComposer: tuning-free multi-subject personalised text-to-image generation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_build_dataset, _add_train, _add_generate, _add_evaluate):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fc-pipeline`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
