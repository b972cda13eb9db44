"""The ``fc-pipeline`` command line (:mod:`fc_pipeline.cli.main`) and its generation jobs."""

from fc_pipeline.cli.main import main

__all__ = ["main"]
