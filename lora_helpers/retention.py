"""What the model still knows: general questions, a general text, and replaying the base model's own answers.

Taught in notebook 06 (section "Learning against forgetting") and notebook 04 (section "Replay"). Fine-tuning a
real chat model on 43 facts about a persona teaches it those facts, and can make it forget what it knew: asked
"How many hours are in a day?", an over-trained SmolLM2 answers "I work 40 hours a week.". Two measures, both
against the base model on the same questions and text:

- **retention**: of the general-knowledge questions the base model answers correctly (``general_knowledge.jsonl``,
  each with an accepted-answer pattern), the share the fine-tuned model still answers correctly;
- **forgetting**: the loss on a short general text (``general_text.txt``) after training minus before, as PEFT's
  method comparison measures it (positive: the model has become worse at ordinary text).

The cure the course uses needs no outside data: **replay**. The base model answers a set of general prompts
(``general_prompts.jsonl``, none of them in the evaluation set, each with an accepted-answer pattern) before
training, and its answers that are right and end in time are trained alongside the new data, so the adapter is
also graded on leaving ordinary answers as they were (as targets, ``replay_loss="answers"``, or held to the base's
whole distribution on them, ``"distill"``: ``lora_helpers.distill``). Only right ones: replaying a wrong answer ("A bicycle has 5
wheels.") teaches the model its own mistakes, and they spread to nearby questions (measured on SmolLM2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

from lora_helpers import chat, data, evaluate, files

GENERAL_KNOWLEDGE = "general_knowledge.jsonl"
GENERAL_TEXT = "general_text.txt"
REPLAY_TOKENS = 96  # replayed answers are the base's greedy answers that end within this many tokens


def general_batch(model) -> int:
    """Questions per ``generate()`` call for the general-knowledge set and the replay prompts: 32 on a GPU (the
    cache of 32 answers of a 7B model fits beside it on a T4), 128 on a CPU, where fewer, larger calls are faster
    (measured on SmolLM2, 178 questions, 2 cores: 31 s in two calls, 41 s in batches of 32, the same answers)."""
    return 32 if model.device.type == "cuda" else 128


def general_knowledge() -> list[dict]:
    """The shipped general-knowledge questions (178): ``{"question", "answer", "accept"}``, ``accept`` a
    case-insensitive regex of the answers counted right, ``answer`` the short answer itself (the multiple-choice
    tasks of ``harness``). Enough questions that one flipped answer moves retention by about one point, not four."""
    return data.read_jsonl(data.packaged_data_path(GENERAL_KNOWLEDGE))


def general_text() -> str:
    """The shipped general text (about 280 words of ordinary prose written for the course)."""
    return data.packaged_data_path(GENERAL_TEXT).read_text(encoding="utf-8")


def first_sentence(answer: str) -> str:
    """The answer's first sentence: where a chat model says what it answers, before it explains."""
    return re.split(r"(?<=[.!?])\s|\n", answer.strip(), maxsplit=1)[0]


def correct(answers: list[str], items: list[dict]) -> list[bool]:
    """Whether each answer's first sentence matches its item's accepted-answer pattern.

    Only the first sentence counts: "The answer to this classic math problem is 1. A square has four sides, ..."
    did not answer 4, and a model rambling on would otherwise score by chance.
    """
    return [
        bool(re.search(item["accept"], first_sentence(answer), re.IGNORECASE)) for answer, item in zip(answers, items)
    ]


def retention(base_correct: list[bool], now_correct: list[bool]) -> float | None:
    """Of the questions the base answered correctly, the share still answered correctly (None if there are none)."""
    known = [now for base, now in zip(base_correct, now_correct) if base]
    return sum(known) / len(known) if known else None


def text_loss(model, tokenizer, text: str | None = None) -> float:
    """Mean next-token loss (nats) of the model on ``text`` (default: the shipped general text), cut to the
    positions the model has (the tiny models have 512; the text is about 300 tokens with a real tokenizer)."""
    import torch

    limit = min(getattr(model.config, "max_position_embeddings", 2048), 2048)
    text = text if text is not None else general_text()
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)["input_ids"].to(model.device)
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def measure(model, tokenizer, system_prompt: str = "", max_new_tokens: int = 32) -> dict:
    """General-knowledge answers, which are correct, and the general-text loss of ``model`` as it is now."""
    items = general_knowledge()
    answers = evaluate.generate_answers(
        model, tokenizer, [item["question"] for item in items], system_prompt, max_new_tokens, general_batch(model)
    )
    return {"answers": answers, "correct": correct(answers, items), "text_loss": text_loss(model, tokenizer)}


def _replay_cache(model_path: str, load_in_4bit: bool, system_prompt: str, rows: list[dict]) -> Path:
    key = json.dumps([model_path, load_in_4bit, system_prompt, rows, REPLAY_TOKENS])
    return files.cache_root() / "replay" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def replay_examples(model, tokenizer, settings) -> list[dict]:
    """Prompt/completion examples of the base model's own right answers to ``settings.replay``'s prompts.

    ``model`` is the base, or a peft model, whose adapter is switched off while it answers (``disable_adapter()``:
    the base itself, and about a tenth faster than a fresh adapter, whose B matrices are zero). Answers are greedy,
    asked as training will ask (the run's system prompt), and kept only when they match the prompt's ``accept``
    pattern (when it has one) and end within ``REPLAY_TOKENS``: a cut answer would teach the model not to stop. The
    answers are cached per model (the folder or Hub id it was loaded from), 4-bit or not, system prompt and prompts,
    so later runs reuse them.
    """
    if not settings.replay:
        return []
    rows = data.read_jsonl(data.resolve_dataset_source(settings.replay))
    prompts = [row["question"] for row in rows]
    cache = _replay_cache(model.config.name_or_path, settings.load_in_4bit, settings.system_prompt, rows)
    if cache.exists():
        pairs = json.loads(cache.read_text())
    else:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            answers, finished = evaluate.generate_answers(
                model,
                tokenizer,
                prompts,
                settings.system_prompt,
                max_new_tokens=REPLAY_TOKENS,
                batch_size=general_batch(model),
                return_finished=True,
            )
        right = correct(answers, [{"accept": row.get("accept", "")} for row in rows])  # no pattern: any answer
        pairs = [(q, a) for q, a, done, ok in zip(prompts, answers, finished, right) if done and ok]
        cache.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(cache, pairs)
    return [
        {
            "prompt": chat.question_messages(question, settings.system_prompt),
            "completion": [{"role": "assistant", "content": answer}],
        }
        for question, answer in pairs
    ]
