"""Plural expansion and phrase spans on a table of captions (real spaCy model)."""

import json

import pyarrow as pa
import pytest

from fc_pipeline.data.phrases import (
    Phrase,
    expand_caption,
    expand_plurals,
    indefinite_article,
    noun_phrases,
    phrase_corpus,
)

EXPANSIONS = [
    ("two women sitting on a bench", "a woman and a woman sitting on a bench"),
    ("3 young men playing soccer on the beach",
     "a young man and a young man and a young man playing soccer on the beach"),
    ("four children and a dog in the park",
     "a child and a child and a child and a child and a dog in the park"),
    ("two people walking down the street", "a person and a person walking down the street"),
    ("Two people walking down the street", "A person and a person walking down the street"),
    ("two elderly men talking", "an elderly man and an elderly man talking"),
    ("two old women", "an old woman and an old woman"),
    ("a man and two little girls", "a man and a little girl and a little girl"),
    ("the two police officers standing by a car",
     "a police officer and a police officer standing by a car"),
    ("Two women in red dresses", "A woman and a woman in red dresses"),
    ("five geese on a lake",
     "a goose and a goose and a goose and a goose and a goose on a lake"),
    ("two men, one woman and 3 kids at a table",
     "a man and a man, one woman and a kid and a kid and a kid at a table"),
    ("He and two friends", "He and a friend and a friend"),
    ("two sheep grazing", "a sheep and a sheep grazing"),
    ("The two men walk. Two dogs follow.", "A man and a man walk. A dog and a dog follow."),
    ("2 people", "a person and a person"),
    ("a woman holding two umbrellas", "a woman holding an umbrella and an umbrella"),
]  # fmt: skip

UNTOUCHED = [
    "a man riding a horse",
    "11 men on a field",  # above the expansion limit
    "a group of people on a beach",
    "one woman with her dog",
    "the men's hats on two tables",  # the count belongs to "tables" only
    "people   in  the   rain ,  smiling",  # odd whitespace survives
    "",
]


@pytest.mark.parametrize("caption, expected", EXPANSIONS)
def test_expand_plurals(caption, expected):
    assert expand_plurals(caption) == expected


@pytest.mark.parametrize("caption", UNTOUCHED[:4] + UNTOUCHED[5:])
def test_untouched_captions(caption):
    assert expand_plurals(caption) == caption


def test_possessive_plural_keeps_the_possessor():
    assert expand_plurals("the men's hats on two tables") == "the men's hats on a table and a table"


@pytest.mark.parametrize("caption, _", EXPANSIONS)
def test_every_phrase_span_points_into_the_expanded_caption(caption, _):
    text, phrases = expand_caption(caption)
    assert phrases, caption
    for phrase in phrases:
        assert text[phrase.start : phrase.end] == phrase.text
    starts = [p.start for p in phrases]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


def test_expanded_phrases_are_the_singular_subjects():
    text, phrases = expand_caption("3 young men playing soccer on the beach")
    assert [p.text for p in phrases] == ["a young man"] * 3 + ["soccer", "the beach"]
    assert [(p.start, p.end) for p in phrases[:3]] == [(0, 11), (16, 27), (32, 43)]
    assert phrases[4] == Phrase("the beach", len(text) - 9, len(text))


def test_noun_phrases_offsets_into_string_passed():
    caption = "  A tall man and his dog walk past two red cars."
    phrases = noun_phrases(caption)
    assert [p.text for p in phrases] == ["A tall man", "his dog", "two red cars"]
    for p in phrases:
        assert caption[p.start : p.end] == p.text
    assert noun_phrases("they saw it") == []  # pronouns are not subjects


def test_noun_phrases_of_expanded_caption_match_tracked_spans():
    text, tracked = expand_caption("two women sitting on a bench")
    assert noun_phrases(text) == tracked


@pytest.mark.parametrize(
    "word, article",
    [
        ("man", "a"),
        ("elderly man", "an"),
        ("old woman", "an"),
        ("young man", "a"),
        ("umbrella", "an"),
        ("uniformed officer", "a"),
        ("hour", "an"),
        ("honest man", "an"),
        ("European", "a"),
        ("island", "an"),
        ("one-armed man", "a"),
        ("horse", "a"),
        ("apple", "an"),
    ],
)
def test_indefinite_article(word, article):
    assert indefinite_article(word) == article


def test_phrase_corpus_columns_errors_and_json():
    captions = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "caption": ["two women on a bench", "", "running fast", None],
            "error": [None, None, None, "truncated"],
        }
    )
    rows = {r["id"]: r for r in phrase_corpus(captions).to_pylist()}
    assert rows["a"]["caption"] == "a woman and a woman on a bench"
    assert rows["a"]["raw_caption"] == "two women on a bench"
    assert json.loads(rows["a"]["phrases"]) == [
        {"text": "a woman", "start": 0, "end": 7},
        {"text": "a woman", "start": 12, "end": 19},
        {"text": "a bench", "start": 23, "end": 30},
    ]
    assert rows["a"]["error"] is None
    assert rows["b"]["error"] == "empty_caption"
    assert rows["c"]["error"] == "no_phrases"
    assert rows["d"]["error"] == "truncated"
    assert json.loads(rows["d"]["phrases"]) == []
