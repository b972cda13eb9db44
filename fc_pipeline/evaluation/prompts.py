"""Benchmark prompt sets and their instantiation for subjects.

A prompt set is a JSON file ``{"description": ..., "prompts": {category: [template, ...]}}``.
Templates write ``{class} <|image|>`` for every subject; the k-th ``{class}`` becomes the k-th
subject's class word. The bundled sets (``single``: 30 prompts, ``multi``: 21 two-subject
prompts) cover re-contextualisation, stylisation, accessorisation and actions.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fc_pipeline.evaluation.subjects import Subject
from fc_pipeline.profiles import SUBJECT_MARKER

PROMPT_SET_DIR = Path(__file__).parent / "prompt_sets"
BUNDLED_PROMPT_SETS = {"single": PROMPT_SET_DIR / "single_subject.json", "multi": PROMPT_SET_DIR / "multi_subject.json"}
CLASS_PLACEHOLDER = "{class}"


@dataclass(frozen=True)
class PromptTemplate:
    """One benchmark prompt with ``{class}`` placeholders, and its category."""

    template: str
    category: str

    @property
    def num_subjects(self) -> int:
        return self.template.count(SUBJECT_MARKER)

    def fill(self, class_words: Sequence[str]) -> str:
        """The prompt with the k-th ``{class}`` replaced by ``class_words[k]``."""
        if len(class_words) != self.num_subjects:
            raise ValueError(f"{self.template!r} takes {self.num_subjects} subject(s), got {len(class_words)}")
        pieces = self.template.split(CLASS_PLACEHOLDER)
        return "".join(p + w for p, w in zip(pieces, class_words)) + pieces[-1]


@dataclass(frozen=True)
class BenchmarkCase:
    """One prompt instantiated for one group of subjects."""

    case_id: str
    category: str
    template: str
    prompt: str
    subjects: tuple[Subject, ...]


def load_prompt_set(name_or_path: str | Path) -> list[PromptTemplate]:
    """A bundled set (``single``/``multi``) or a JSON file of the same shape; validates every template."""
    path = BUNDLED_PROMPT_SETS.get(str(name_or_path), Path(name_or_path))
    if not path.is_file():
        raise ValueError(
            f"prompt set {name_or_path!r} not found; use one of {sorted(BUNDLED_PROMPT_SETS)} or a JSON file"
        )
    try:
        categories = json.loads(path.read_text())["prompts"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f'{path}: expected {{"prompts": {{category: [template, ...]}}}} ({exc})') from None
    templates = [PromptTemplate(t, category) for category, items in categories.items() for t in items]
    for t in templates:
        if t.num_subjects == 0 or t.template.count(CLASS_PLACEHOLDER) != t.num_subjects:
            raise ValueError(f"{path}: every subject needs '{CLASS_PLACEHOLDER} {SUBJECT_MARKER}': {t.template!r}")
    if len({t.num_subjects for t in templates}) > 1:
        raise ValueError(f"{path}: all prompts of a set must have the same number of subjects")
    if not templates:
        raise ValueError(f"{path}: the prompt set is empty")
    return templates


def benchmark_cases(
    subjects: Sequence[Subject],
    templates: Sequence[PromptTemplate],
    max_prompts: int | None = None,
    max_subject_groups: int | None = None,
) -> list[BenchmarkCase]:
    """Every (capped) prompt × every group of distinct subjects (all pairs for two-subject prompts)."""
    n = templates[0].num_subjects
    groups = list(itertools.combinations(subjects, n))
    if not groups:
        raise ValueError(f"the prompt set needs {n} subjects per prompt but the subjects folder has {len(subjects)}")
    groups = groups[:max_subject_groups]
    cases = []
    for p, template in enumerate(templates[:max_prompts]):
        for group in groups:
            case_id = f"p{p:02d}-" + "+".join(s.name for s in group)
            cases.append(
                BenchmarkCase(
                    case_id, template.category, template.template, template.fill([s.class_word for s in group]), group
                )
            )
    return cases
