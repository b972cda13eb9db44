"""Checkpoint safety and documentation: safetensors only, and the model card of every checkpoint.

A pickled weight file (``.bin``, ``.pt``, ...) can run arbitrary code when it is loaded, so a
checkpoint holding one is refused before anything reads it. A checkpoint you trust converts with
``python -m fc_pipeline.checkpoints SRC DST``. Imports diffusers lazily.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CARD_KEY = "fastcomposer"  # the model card's metadata key holding `card_data`


class UnsafeCheckpointError(Exception):
    """A checkpoint holds pickled weights (which can run code when loaded); it is not loaded."""


def refuse_pickled_weights(checkpoint: str | Path) -> None:
    """Raise ``UnsafeCheckpointError`` if any file under ``checkpoint`` is a pickled weight file."""
    root = Path(checkpoint)
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if found:
        raise UnsafeCheckpointError(
            f"{found[0]}: pickled weights are refused (loading them can run code); checkpoints are safetensors "
            f"only. If you trust this checkpoint, convert it: python -m fc_pipeline.checkpoints {root} {root}-safe"
        )


def convert_to_safetensors(source: str | Path, target: str | Path) -> Path:
    """Re-save a trusted checkpoint with pickled weights as a safetensors-only checkpoint at ``target``.

    The weights are read with the loaders' ``weights_only`` unpickler; only run this on a
    checkpoint whose origin you trust.
    """
    from fc_pipeline.pipeline import FastComposerPipeline

    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} exists; give a new directory for the converted checkpoint")
    pipe = FastComposerPipeline.from_pretrained(source, use_safetensors=None)
    pipe.save_pretrained(target)
    return target


def _table(rows: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


def render_model_card(card_data: dict[str, Any], scheduler: str):
    """The ``huggingface_hub.ModelCard`` of a checkpoint from its ``card_data``.

    ``card_data`` keys (all optional): ``base_model`` and ``image_encoder`` (model ids),
    ``training_data`` (a summary: text or a dict), ``training`` (settings) and ``metrics``
    (``fc-pipeline evaluate`` numbers); ``scheduler`` is the inference scheduler's class name.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = card_data.get("base_model")
    metadata = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["fastcomposer", "subject-driven-generation", "stable-diffusion"],
        base_model=base if base and "/" in base and not Path(base).exists() else None,  # hub ids only
        **{CARD_KEY: card_data},
    )
    data = card_data.get("training_data")
    data_text = _table(data) if isinstance(data, dict) else data or "Not recorded."
    training = card_data.get("training")
    metrics = card_data.get("metrics")
    sections = [
        "# FastComposer checkpoint",
        "Tuning-free multi-subject personalised text-to-image generation (FastComposer, Xiao et al. 2023): "
        "Stable Diffusion whose subject nouns, marked `<|image|>` in the prompt, take the identity of one "
        "reference photo each, with delayed subject conditioning.",
        "## Base model",
        _table(
            {
                "Stable Diffusion": base or "not recorded",
                "subject encoder": card_data.get("image_encoder") or "not recorded",
                "inference scheduler": f"{scheduler} (swap with `fc-pipeline generate --scheduler NAME`)",
            }
        ),
        "## Training data",
        data_text,
        "## Training",
        _table(training) if training else "Not recorded.",
        "## Metrics",
        _table(metrics)
        if metrics
        else "Not evaluated yet: `fc-pipeline evaluate --checkpoint DIR --out report/` measures identity "
        "preservation and prompt consistency.",
        "## Intended use",
        "Research on subject-driven image generation and creative use with photos of people who consented. "
        "Generate with `FastComposerPipeline.from_pretrained(DIR)` or `fc-pipeline generate --checkpoint DIR`.",
        "## Limitations",
        "- Trained on people only (COCO `person` segments); other subject classes are not preserved.\n"
        "- Identity preservation is partial and drops with several subjects or small faces; the image "
        "encoder sees one 224-pixel crop per subject.\n"
        "- Inherits Stable Diffusion 1.5's biases and failure modes (hands, text, crowded scenes).\n"
        "- It can depict real people in situations they never were in: do not use it to deceive, harass "
        "or impersonate, and label generated images as such.",
        "## Usage",
        "```python\nfrom fc_pipeline.pipeline import FastComposerPipeline\n\n"
        'pipe = FastComposerPipeline.from_pretrained("DIR")\n'
        'image = pipe("a man <|image|> on the beach", subject_images=["man.jpg"], alpha=0.7).images[0]\n```',
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def read_card_data(checkpoint: str | Path) -> dict[str, Any]:
    """The ``card_data`` stored in a checkpoint's ``README.md`` (empty when it has none)."""
    from huggingface_hub import ModelCard

    readme = Path(checkpoint) / "README.md"
    if not readme.is_file():
        return {}
    return dict(ModelCard.load(readme).data.to_dict().get(CARD_KEY) or {})


def main(argv: list[str] | None = None) -> int:
    """``python -m fc_pipeline.checkpoints SRC DST``: convert a trusted pickled checkpoint to safetensors."""
    parser = argparse.ArgumentParser(prog="python -m fc_pipeline.checkpoints", description=main.__doc__)
    parser.add_argument("source", help="the trusted checkpoint directory with pickled weights")
    parser.add_argument("target", help="new directory for the safetensors checkpoint")
    args = parser.parse_args(argv)
    try:
        print(convert_to_safetensors(args.source, args.target))
    except (OSError, ValueError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
