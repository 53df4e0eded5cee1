import re
import types

import pytest
import torch

from lora_helpers import evaluate, presets, retention


def test_the_general_sets_are_shipped_and_disjoint():
    items = retention.general_knowledge()
    assert len(items) >= 150 and len({item["question"] for item in items}) == len(items)
    for item in items:
        re.compile(item["accept"])
    plain = lambda question: re.sub(r"[^a-z0-9 ]", "", question.lower())  # noqa: E731
    rows = retention.data.read_jsonl(retention.data.packaged_data_path("general_prompts.jsonl"))
    replay = {plain(row["question"]) for row in rows}
    assert len(replay) == len(rows) >= 200  # no prompt twice
    assert not replay & {plain(item["question"]) for item in items}  # replay never measures itself
    assert len(retention.general_text().split()) > 200


def test_correct_and_retention():
    items = [{"question": "q1", "accept": r"\bParis\b"}, {"question": "q2", "accept": r"\b(7|seven)\b"}]
    assert retention.correct(["paris, of course", "Seventy"], items) == [True, False]
    assert retention.retention([True, True, False], [True, False, True]) == 0.5
    assert retention.retention([False, False], [True, True]) is None


def test_text_loss_is_lower_for_text_the_model_was_fitted_to(tiny_dir, tiny_tokenizer):
    from lora_helpers import models

    model = models.load_model("tiny", load_in_4bit=False)
    assert retention.text_loss(model, tiny_tokenizer, "What is your name?") == pytest.approx(
        retention.text_loss(model, tiny_tokenizer, "What is your name?")
    )
    assert retention.text_loss(model, tiny_tokenizer) > 0


def test_replay_keeps_only_right_finished_answers_and_is_cached(tiny_dir, tiny_tokenizer, monkeypatch):
    """Of the base's answers, replay keeps those that match their pattern and end in time, and asks only once."""
    settings = presets.resolve_settings("tiny", replay="package:general_prompts.jsonl")
    rows = retention.data.read_jsonl(retention.data.packaged_data_path("general_prompts.jsonl"))
    canned = {  # question -> (answer, finished)
        "What is the capital of Australia?": ("The capital of Australia is Canberra.", True),  # kept
        "How many wheels does a bicycle have?": ("A bicycle has 5 wheels.", True),  # wrong: dropped
        "What is the capital of Egypt?": ("The capital of Egypt is Cairo, a city that", False),  # cut: dropped
    }
    calls = []

    def fake_generate(model, tokenizer, questions, system_prompt="", max_new_tokens=64, return_finished=False, **kw):
        calls.append(questions)
        assert max_new_tokens == retention.REPLAY_TOKENS and return_finished
        answers = [canned.get(q, ("I do not know.", True)) for q in questions]
        return [a for a, _ in answers], [f for _, f in answers]

    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    # only its origin and its device are read
    model = types.SimpleNamespace(config=types.SimpleNamespace(name_or_path=str(tiny_dir)), device=torch.device("cpu"))
    first = retention.replay_examples(model, tiny_tokenizer, settings)
    again = retention.replay_examples(model, tiny_tokenizer, settings)
    assert len(calls) == 1 and calls[0] == [row["question"] for row in rows]  # the second call read the cache
    assert first == again
    assert [e["prompt"][-1]["content"] for e in first] == ["What is the capital of Australia?"]
    assert first[0]["completion"] == [{"role": "assistant", "content": "The capital of Australia is Canberra."}]
    assert retention.replay_examples(model, tiny_tokenizer, presets.resolve_settings("tiny")) == []
