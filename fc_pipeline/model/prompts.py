"""Subject prompts: where each reference image binds to the text (paper §4.1).

A prompt marks every subject with ``<|image|>`` right after its noun:
``"a man <|image|> and a woman <|image|> in a park"``. The marker is removed before tokenising
(the CLIP BPE would split it into several tokens) and the reference image is bound to the token
just before it, i.e. the noun's last BPE token. Training captions carry subjects as character
spans instead; both end in the same token lookup.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fc_pipeline.profiles import SUBJECT_MARKER

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class SubjectPrompt:
    """A tokenised prompt with the positions of its subject tokens."""

    text: str
    input_ids: torch.Tensor  # LongTensor [model_max_length]
    subject_token_index: list[int]


def _tokenize(text: str, tokenizer) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    encoding = tokenizer(
        text,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_offsets_mapping=True,
    )
    return torch.tensor(encoding["input_ids"], dtype=torch.long), list(encoding["offset_mapping"])


def _last_token_before(offsets: Sequence[tuple[int, int]], char_end: int) -> int | None:
    """Index of the last text token that starts before ``char_end`` (special tokens have no span)."""
    found = None
    for index, (start, end) in enumerate(offsets):
        if end > start and start < char_end:
            found = index
    return found


def _subject_indices(text: str, ends: Sequence[int], tokenizer, what: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
    input_ids, offsets = _tokenize(text, tokenizer)
    last_char = max((end for start, end in offsets if end > start), default=0)
    indices = []
    for char_end, name in zip(ends, what):
        index = _last_token_before(offsets, char_end)
        if index is None or char_end > last_char:
            raise ValueError(
                f"prompt too long: the subject {name} falls beyond the {tokenizer.model_max_length}-token "
                f"limit of the text encoder; shorten the prompt"
            )
        indices.append(index)
    return input_ids, indices


def parse_subject_prompt(prompt: str, tokenizer, num_images: int | None = None) -> SubjectPrompt:
    """Remove the ``<|image|>`` markers of a prompt and find the token each one binds to.

    Raises ``ValueError`` when the number of markers differs from ``num_images``, when a marker
    has no word before it (or follows the same word as another marker), or when a subject token
    is truncated away by the tokenizer's length limit.
    """
    pieces = prompt.split(SUBJECT_MARKER)
    n_markers = len(pieces) - 1
    if num_images is not None and n_markers != num_images:
        raise ValueError(
            f"the prompt has {n_markers} {SUBJECT_MARKER} marker(s) but {num_images} reference image(s) "
            f"were given; put one marker right after the noun of each subject, e.g. "
            f"'a man {SUBJECT_MARKER} and a woman {SUBJECT_MARKER}'"
        )
    text, ends = _WHITESPACE.sub(" ", pieces[0]).lstrip(), []
    for number, piece in enumerate(pieces[1:], start=1):
        text = text.rstrip()
        if not text or not text[-1].isalnum():
            raise ValueError(
                f"{SUBJECT_MARKER} marker #{number} has no word before it; write it right after the "
                f"subject's noun, e.g. 'a man {SUBJECT_MARKER}'"
            )
        if ends and ends[-1] == len(text):
            raise ValueError(f"{SUBJECT_MARKER} markers #{number - 1} and #{number} follow the same word")
        ends.append(len(text))
        text += _WHITESPACE.sub(" ", piece)
    text = text.rstrip()
    names = [f"#{n} ({text[:end].split()[-1]!r})" for n, end in enumerate(ends, start=1)]
    input_ids, indices = _subject_indices(text, ends, tokenizer, names)
    return SubjectPrompt(text=text, input_ids=input_ids, subject_token_index=indices)


def subject_token_indices_from_spans(
    text: str, spans: Sequence[tuple[int, int]], tokenizer
) -> tuple[torch.Tensor, list[int]]:
    """Token ids of ``text`` and, per subject character span ``(start, end)``, the index of the
    span's last token (the noun of a noun phrase such as "a young man").

    Raises ``ValueError`` for an empty or out-of-range span or one truncated away by the tokenizer.
    """
    for start, end in spans:
        if not 0 <= start < end <= len(text):
            raise ValueError(f"subject span ({start}, {end}) does not lie inside the caption of length {len(text)}")
    names = [repr(text[start:end]) for start, end in spans]
    return _subject_indices(text, [end for _, end in spans], tokenizer, names)
