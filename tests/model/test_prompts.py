import pytest
import torch

from fc_pipeline.model.prompts import parse_subject_prompt, subject_token_indices_from_spans


def _tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids.tolist())


def test_markers_bind_to_the_noun_before_them(tokenizer):
    prompt = parse_subject_prompt("a man <|image|> and a  woman <|image|> in a park", tokenizer, num_images=2)
    assert prompt.text == "a man and a woman in a park"
    assert prompt.input_ids.shape == (77,) and prompt.input_ids.dtype == torch.long
    tokens = _tokens(tokenizer, prompt.input_ids)
    assert [tokens[i] for i in prompt.subject_token_index] == ["man</w>", "woman</w>"]
    assert prompt.subject_token_index == [2, 5]
    plain = tokenizer(prompt.text, padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert torch.equal(prompt.input_ids, plain)


def test_marker_glued_to_word_and_punctuation(tokenizer):
    prompt = parse_subject_prompt("A photographer<|image|>, smiling", tokenizer, num_images=1)
    assert prompt.text == "A photographer, smiling"
    assert _tokens(tokenizer, prompt.input_ids)[prompt.subject_token_index[0]] == "photographer</w>"


def test_multi_token_noun_binds_its_last_token(tokenizer):
    prompt = parse_subject_prompt("a xylophonist <|image|>", tokenizer)
    tokens = _tokens(tokenizer, prompt.input_ids)
    index = prompt.subject_token_index[0]
    assert tokens[index].endswith("</w>") and index >= 3  # several BPE pieces, the last one bound


def test_text_only_prompt(tokenizer):
    prompt = parse_subject_prompt("a park at night", tokenizer, num_images=0)
    assert prompt.subject_token_index == []


@pytest.mark.parametrize(
    "text, images, message",
    [
        ("a man <|image|>", 2, "1 <|image|> marker"),
        ("a man and a woman", 1, "0 <|image|> marker"),
        ("<|image|> a man", 1, "no word before it"),
        ("a man , <|image|>", 1, "no word before it"),
        ("a man <|image|> <|image|>", 2, "follow the same word"),
        ("word " * 80 + "man <|image|>", 1, "prompt too long"),
    ],
)
def test_bad_prompts_raise_clear_errors(tokenizer, text, images, message):
    with pytest.raises(ValueError, match=message):
        parse_subject_prompt(text, tokenizer, num_images=images)


def test_spans_give_the_phrase_last_token(tokenizer):
    text = "a young man and a woman on a beach"
    ids, index = subject_token_indices_from_spans(text, [(0, 11), (16, 23)], tokenizer)
    tokens = _tokens(tokenizer, ids)
    assert [tokens[i] for i in index] == ["man</w>", "woman</w>"]
    with pytest.raises(ValueError, match="does not lie inside"):
        subject_token_indices_from_spans(text, [(5, 100)], tokenizer)
    long_text = "word " * 80 + "a man"
    with pytest.raises(ValueError, match="too long"):
        subject_token_indices_from_spans(long_text, [(len(long_text) - 5, len(long_text))], tokenizer)
