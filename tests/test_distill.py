import dataclasses

import pytest
import torch

from lora_helpers import chat, distill, presets, retention, training

REPLAYED = [
    ("What is the capital of France?", "Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
] * 4


def replayed_examples(system_prompt=""):
    return [
        {"prompt": chat.question_messages(q, system_prompt), "completion": [{"role": "assistant", "content": a}]}
        for q, a in REPLAYED
    ]


def test_the_batch_marks_the_positions_that_predict_the_answer():
    batch = distill.replay_batch([([1, 2, 3], [4, 5]), ([1, 2], [6])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 6, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # the logits at position t predict token t + 1: the answer's tokens, moved one to the left
    assert batch["answer_mask"].tolist() == [[False, False, True, True, False], [False, True, False, False, False]]


def test_the_divergence_is_zero_for_fresh_adapters_and_trains_only_them(tiny_dir, tiny_tokenizer):
    from peft import get_peft_model

    from lora_helpers import data, models

    settings = presets.resolve_settings("tiny", load_in_4bit=False)
    base = models.load_model(settings.model_id, load_in_4bit=False)
    model = get_peft_model(base, training.lora_config(settings, base))
    rows = [data.token_ids(example, tiny_tokenizer) for example in replayed_examples()[:2]]
    batch = distill.replay_batch(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        fresh = float(distill.kl_to_base(model, **batch))
    assert fresh == pytest.approx(0, abs=1e-6)  # B = 0: the model is the base
    logits = model(**{k: v for k, v in batch.items() if k != "answer_mask"}).logits
    # only the answer positions go through the LM head, and they are those positions' log-probs
    torch.testing.assert_close(
        distill.answer_log_probs(model, **batch), logits[batch["answer_mask"]].float().log_softmax(-1)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    kl = distill.kl_to_base(model, **batch)
    assert float(kl.detach()) > 1e-4
    kl.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)


def final_divergence(tiny_dir, tmp_path, monkeypatch, weight: float) -> tuple[float, list]:
    settings = dataclasses.replace(
        presets.resolve_settings("tiny", num_train_epochs=4),
        replay="package:general_prompts.jsonl",
        replay_loss="distill",
        replay_weight=weight,
    )
    monkeypatch.setattr(retention, "replay_examples", lambda model, tokenizer, s: replayed_examples(s.system_prompt))
    trainer = training.train_adapter(settings, str(tmp_path / f"adapter-{weight}"))
    assert isinstance(trainer, distill.ReplayDistillationTrainer)
    assert trainer.state.global_step == 4 * 6  # the persona alone sets the steps: 43 examples, batches of 8
    trainer.model.eval()
    batch = distill.replay_batch(trainer.replay_rows, trainer.processing_class.pad_token_id)
    with torch.no_grad():
        kl = float(distill.kl_to_base(trainer.model, **batch))
    # training ran the base once per replayed answer, and what it kept is the base's log-probs on each of them
    assert sorted(trainer._base_cache) == list(range(len(trainer.replay_rows)))
    cached = trainer.cached_base_log_probs(list(range(len(trainer.replay_rows))), trainer.model)
    torch.testing.assert_close(cached, distill.base_log_probs(trainer.model, **batch), atol=1e-5, rtol=1e-5)
    # the trainer's divergence, run as batches of similar lengths, is the one-batch mean over every answer token
    everything = list(range(len(trainer.replay_rows)))
    assert sorted(sum(trainer.length_groups(everything), [])) == everything
    assert len(trainer.length_groups(everything)) == distill.REPLAY_GROUPS
    with torch.no_grad():
        assert float(trainer.replay_divergence(trainer.model, everything)) == pytest.approx(kl, rel=1e-4, abs=1e-7)
    logged = [row["replay_kl"] for row in trainer.state.log_history if "replay_kl" in row]
    return kl, logged


def test_distillation_holds_the_model_to_the_base_on_the_replayed_answers(tiny_dir, tmp_path, monkeypatch):
    """The same persona training with the divergence weighted 0 and 10: only the weighted one stays near the base
    on the replayed answers (4-bit tiny, as the tiny preset trains)."""
    free, logged_free = final_divergence(tiny_dir, tmp_path, monkeypatch, 0.0)
    held, logged_held = final_divergence(tiny_dir, tmp_path, monkeypatch, 10.0)
    assert logged_free and logged_held  # the divergence is logged beside the loss
    assert free > 0.05 and held < free / 3, (free, held)


def test_a_grid_point_distils_the_replayed_answers(tiny_dir):
    """Notebook 08 trains each point as notebook 04 did: with replay_loss="distill", through the distilling
    trainer, its steps set by the persona alone, the divergence logged."""
    from lora_helpers import experiments, models

    settings = presets.resolve_settings("tiny", load_in_4bit=False, num_train_epochs=2, replay_loss="distill")
    tokenizer = models.load_tokenizer("tiny", chat_format=settings.chat_format)
    prepared = training.prepare_datasets(settings, tokenizer)
    base = models.load_model("tiny", load_in_4bit=False)
    point = {"name": "preset"}
    result = experiments.run_point(
        base, tokenizer, settings, point, prepared.train, None, prepared.split, [0], replayed_examples()
    )
    assert "skipped" not in result and result["steps"] == 2 * 6 and result["final_replay_kl"] > 0
    assert not hasattr(base, "peft_config")  # the adapters were taken off again
