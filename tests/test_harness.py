"""lm-evaluation-harness on the course's own tasks, offline (notebook 08): written from the run's data, run on the
base and on base + adapter through the harness's own ``peft=`` argument."""

import json

import pytest

from lora_helpers import harness, models, presets, retention, training


def test_multiple_choice_keeps_the_answer_among_three_distractors_of_the_same_kind():
    pairs = [(item["question"], item["answer"]) for item in retention.general_knowledge()]
    rows = harness.multiple_choice(pairs)
    assert len(rows) == len(pairs)
    for (_, answer), row in zip(pairs, rows):
        assert len(row["choices"]) == 4 == len(set(row["choices"])) and row["choices"][row["label"]] == answer
    capitals = {answer for question, answer in pairs if question.startswith("What is the capital of")}
    for row in rows:
        if row["question"].startswith("What is the capital of"):
            assert set(row["choices"]) <= capitals  # distractors of the same kind: other capitals
    assert len({row["label"] for row in rows}) == 4  # the right answer is not always in the same place
    assert harness.multiple_choice(pairs) == rows  # the same seed writes the same task


def test_every_general_question_has_an_answer_its_own_pattern_accepts():
    for item in retention.general_knowledge():
        if item["question"] != "What is a baby cat called?":  # the pattern asks for "is a kitten" in a sentence
            assert retention.correct([item["answer"]], [item]) == [True], item


def test_the_harness_scores_base_and_adapter_offline(tmp_path, tiny_dir, monkeypatch):
    pytest.importorskip("lm_eval", reason=harness.MISSING)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    settings = presets.resolve_settings("tiny")  # 30 epochs, 5 questions held out
    training.train_adapter(settings, str(tmp_path / "adapter"))
    tokenizer = models.load_tokenizer(settings.model_id, chat_format=settings.chat_format)
    split = training.prepare_datasets(settings, tokenizer).split
    folder = harness.write_tasks(tmp_path / "tasks", split["train"], split["eval"])
    assert harness.written_tasks(folder) == list(harness.TASKS)
    rows = [json.loads(line) for line in (folder / "course_persona_trained.jsonl").read_text().splitlines()]
    assert [row["question"] for row in rows] == [entry[0] for entry in split["train"]]

    base_path = models.resolve_model_path(settings.model_id)
    base = harness.scores(harness.run({"pretrained": base_path}, folder))
    tuned = harness.scores(harness.run({"pretrained": base_path, "peft": str(tmp_path / "adapter")}, folder))
    assert set(base) == set(tuned) == set(harness.TASKS)
    # Random weights: the base picks at chance; the adapter prefers the answers it was trained on.
    assert base["course_persona_trained"] < 0.5 and tuned["course_persona_trained"] >= 0.8
    assert tuned["course_general_text"] != base["course_general_text"] > 1.0  # a perplexity, changed by the adapter
    assert "--model_args pretrained=" in harness.command_line({"pretrained": base_path}, folder)


def test_a_missing_harness_says_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval":
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[eval\]'"):
        harness.require_lm_eval()
