"""fc-pipeline: FastComposer as a library (dataset construction, model, training, inference,
evaluation). Usable without Dagster; ``assets/`` is the Dagster glue."""

__version__ = "0.1.0"
