"""Evaluation subjects: a folder with one sub-folder of reference photo(s) per identity.

An optional ``subjects.json`` beside the sub-folders gives each subject's class word
(``{"paul_rudd": "man", ...}``); subjects it does not name get the default word ("person").
The paper's benchmark layout — the 15 CelebA test identities, one folder per identity named by its
CelebA id (``000001/``, ...) with one image — needs no ``subjects.json``: a folder holding only
those ids takes the class words of the official evaluation (man/woman).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fc_pipeline.images import IMAGE_SUFFIXES, ImageError, load_image
from fc_pipeline.storage import atomic_write, write_json

SUBJECTS_METADATA = "subjects.json"
DEFAULT_CLASS_WORD = "person"
# The official evaluation's class word of each CelebA test identity (its single-subject benchmark).
CELEBA_TEST_CLASS_WORDS = {
    "000001": "man",
    "000181": "man",
    "000268": "man",
    "000612": "woman",
    "000667": "woman",
    "001603": "woman",
    "001854": "man",
    "002088": "woman",
    "002464": "woman",
    "002782": "man",
    "002880": "woman",
    "002929": "woman",
    "002937": "woman",
    "003785": "man",
    "004153": "woman",
}


@dataclass(frozen=True)
class Subject:
    """One identity: its name (folder), class word and reference images (sorted paths)."""

    name: str
    class_word: str
    references: tuple[Path, ...]

    def reference_image(self) -> Image.Image:
        """The first reference photo (the one the model is conditioned on and scored against)."""
        return load_image(self.references[0])


def load_subjects(subjects_dir: str | Path, class_word: str = DEFAULT_CLASS_WORD) -> list[Subject]:
    """Read a subjects folder; raises ``ValueError`` naming what is wrong (nothing is skipped silently)."""
    root = Path(subjects_dir)
    if not root.is_dir():
        raise ValueError(f"subjects folder not found: {root}")
    metadata_path = root / SUBJECTS_METADATA
    class_words: dict[str, str] = {}
    if metadata_path.exists():
        try:
            class_words = json.loads(metadata_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{metadata_path} is not valid JSON: {exc}") from None
        if not isinstance(class_words, dict) or not all(isinstance(v, str) and v.strip() for v in class_words.values()):
            raise ValueError(
                f'{metadata_path} must map subject folder names to class words, e.g. {{"paul_rudd": "man"}}'
            )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    celeba = folders and {f.name for f in folders} <= CELEBA_TEST_CLASS_WORDS.keys()
    default_words = CELEBA_TEST_CLASS_WORDS if celeba else {}
    subjects, problems = [], []
    for folder in folders:
        references = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        if not references:
            problems.append(f"{folder.name}: no reference image ({', '.join(IMAGE_SUFFIXES)})")
            continue
        try:
            load_image(references[0])
        except ImageError as exc:
            problems.append(f"{folder.name}: {exc}")
            continue
        word = class_words.get(folder.name) or default_words.get(folder.name, class_word)
        subjects.append(Subject(folder.name, word.strip(), references))
    unknown = sorted(set(class_words) - {s.name for s in subjects} - {p.split(":")[0] for p in problems})
    if unknown:
        problems.append(f"{SUBJECTS_METADATA} names subjects without a folder: {unknown}")
    if problems:
        raise ValueError(f"bad subjects folder {root}:\n  " + "\n  ".join(problems))
    if not subjects:
        raise ValueError(
            f"subjects folder {root} has no sub-folders; expected one folder of reference photos per identity"
        )
    return subjects


def write_demo_subjects(out_dir: str | Path) -> Path:
    """A two-identity subjects folder from photos that installed packages ship (works offline).

    Grace Hopper comes with matplotlib's sample data, Eileen Collins (``astronaut``) with
    scikit-image; both are public-domain portraits with one clear face.
    """
    import matplotlib.cbook
    import skimage.data

    out = Path(out_dir)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        hopper = Image.open(handle).convert("RGB")
    photos = {"grace_hopper": hopper, "eileen_collins": Image.fromarray(skimage.data.astronaut())}
    for name, photo in photos.items():
        target = out / name / "1.png"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(target) as handle:
                photo.save(handle, format="PNG")
    write_json({name: "woman" for name in photos}, out / SUBJECTS_METADATA)
    return out
