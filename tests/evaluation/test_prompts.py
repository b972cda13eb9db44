"""Prompt sets, subjects folders and prompt consistency."""

import json

import numpy as np
import pytest
from PIL import Image

from fc_pipeline.evaluation.prompt_consistency import PromptConsistency, strip_markers
from fc_pipeline.evaluation.prompts import PromptTemplate, benchmark_cases, load_prompt_set
from fc_pipeline.evaluation.subjects import load_subjects
from fc_pipeline.profiles import SUBJECT_MARKER

CATEGORIES = {"re-contextualisation", "stylisation", "accessorisation", "actions"}


def test_bundled_prompt_sets_have_the_protocol_sizes():
    single, multi = load_prompt_set("single"), load_prompt_set("multi")
    assert len(single) == 30 and len(multi) == 21
    for templates, subjects in ((single, 1), (multi, 2)):
        assert {t.category for t in templates} == CATEGORIES
        assert {t.num_subjects for t in templates} == {subjects}
        assert len({t.template for t in templates}) == len(templates)


def test_class_words_fill_in_subject_order():
    template = PromptTemplate("a {class} <|image|> and a {class} <|image|> playing chess", "actions")
    assert template.fill(["man", "woman"]) == "a man <|image|> and a woman <|image|> playing chess"
    with pytest.raises(ValueError, match="takes 2 subject"):
        template.fill(["man"])


def test_cases_cover_all_pairs_with_class_words_from_metadata(faces_dir, tmp_path):
    subjects = load_subjects(faces_dir / "subjects")
    assert [s.name for s in subjects] == ["angelina_jolie", "kate_siegel", "paul_rudd", "shea_whigham"]
    assert {s.class_word for s in subjects} == {"person"}
    multi = benchmark_cases(subjects, load_prompt_set("multi"))
    assert len(multi) == 21 * 6  # every prompt × all 6 pairs of 4 subjects
    assert len({c.case_id for c in multi}) == len(multi)
    single = benchmark_cases(subjects, load_prompt_set("single"), max_prompts=3, max_subject_groups=2)
    assert len(single) == 6

    # a subjects folder with class words in subjects.json
    for name in ("ann", "bob"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / name / "ref.png")
    (tmp_path / "subjects.json").write_text(json.dumps({"ann": "woman", "bob": "man"}))
    case = benchmark_cases(load_subjects(tmp_path), load_prompt_set("multi"), max_prompts=1)[0]
    assert case.prompt == "a woman <|image|> and a man <|image|> on a beach at sunset"


def test_bad_subjects_folders_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_subjects(tmp_path / "missing")
    with pytest.raises(ValueError, match="no sub-folders"):
        load_subjects(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError) as error:
        load_subjects(tmp_path)
    assert "empty: no reference image" in str(error.value) and "broken: unreadable" in str(error.value)


def test_bad_prompt_sets_are_rejected(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"prompts": {"actions": ["a person reading"]}}))
    with pytest.raises(ValueError, match="every subject needs"):
        load_prompt_set(path)
    with pytest.raises(ValueError, match="not found"):
        load_prompt_set("nonexistent")


def test_prompt_consistency_is_deterministic_and_ignores_markers(prompt_scorer, faces_dir):
    image = Image.open(faces_dir / "multiface.jpg")
    prompts = [f"a man {SUBJECT_MARKER} reading a book", "a group of people"]
    first = prompt_scorer.score([image, image], prompts)
    again = PromptConsistency("tiny").score([image, image], prompts)  # a fresh model from the same seed
    np.testing.assert_array_equal(first, again)
    assert first.shape == (2,) and np.all(np.abs(first) <= 100)
    assert first[0] != first[1]
    plain = prompt_scorer.score([image], ["a man reading a book"])
    assert plain[0] == pytest.approx(first[0], abs=1e-4)
    assert strip_markers(f"a  man {SUBJECT_MARKER}  and a woman {SUBJECT_MARKER}") == "a man and a woman"
    with pytest.raises(ValueError, match="one prompt per image"):
        prompt_scorer.score([image], prompts)
