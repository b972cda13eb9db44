"""Evaluation (paper §5): identity preservation, prompt consistency, benchmark runner, report.

Everything here works without Dagster; ``assets/evaluation.py`` only calls :func:`run_evaluation`.
"""

from fc_pipeline.evaluation.faces import (
    DetectedFaces,
    FaceDetector,
    FaceEmbedder,
    FaceScorer,
    MultiIdentityResult,
    OpenCVFaceNetEmbedder,
    TorchFaceNetEmbedder,
    default_face_scorer,
    face_embedder,
    greedy_assignment,
    hungarian_assignment,
    identity_score,
    match_subjects,
    multi_identity_score,
)
from fc_pipeline.evaluation.prompt_consistency import PromptConsistency, prompt_consistency, strip_markers
from fc_pipeline.evaluation.prompts import BenchmarkCase, PromptTemplate, benchmark_cases, load_prompt_set
from fc_pipeline.evaluation.report import comparison, summarise
from fc_pipeline.evaluation.runner import PAPER_ALPHA_SWEEP, EvaluationConfig, evaluate_pipeline, run_evaluation
from fc_pipeline.evaluation.subjects import Subject, load_subjects, write_demo_subjects

__all__ = [
    "BenchmarkCase",
    "DetectedFaces",
    "EvaluationConfig",
    "FaceDetector",
    "FaceEmbedder",
    "FaceScorer",
    "MultiIdentityResult",
    "OpenCVFaceNetEmbedder",
    "PAPER_ALPHA_SWEEP",
    "PromptConsistency",
    "PromptTemplate",
    "Subject",
    "TorchFaceNetEmbedder",
    "benchmark_cases",
    "comparison",
    "default_face_scorer",
    "evaluate_pipeline",
    "face_embedder",
    "greedy_assignment",
    "hungarian_assignment",
    "identity_score",
    "load_prompt_set",
    "load_subjects",
    "match_subjects",
    "multi_identity_score",
    "prompt_consistency",
    "run_evaluation",
    "strip_markers",
    "summarise",
    "write_demo_subjects",
]
