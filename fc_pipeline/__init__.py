"""fc-pipeline: FastComposer as a library (dataset construction, model, training, inference,
evaluation). Usable without Dagster; ``assets/`` is the Dagster glue."""

__version__ = "0.1.0"

__all__ = ["SubjectFuser"]


def __getattr__(name: str):
    # diffusers' model_index.json records ["fc_pipeline", "SubjectFuser"]; importing it lazily
    # keeps `import fc_pipeline` free of torch/diffusers
    if name == "SubjectFuser":
        from fc_pipeline.model.fuser import SubjectFuser

        return SubjectFuser
    raise AttributeError(f"module 'fc_pipeline' has no attribute {name!r}")
