"""Greedy answers and exact match: did the model learn the answers?

Taught in notebook 06 (section "Did it learn?"); notebook 04 uses it for a first check.
"""

from __future__ import annotations


def greedy(max_new_tokens: int, **extra) -> dict:
    """``generate`` arguments for greedy decoding, whatever the model's own generation config says.

    Llama-2 and Llama-3 chat models ship a generation config that samples (``do_sample=True``,
    temperature 0.6, top-p 0.9): without ``do_sample=False`` the same question gets a different answer each time.
    Temperature and top-p are set to their neutral values so that transformers has nothing to warn about, and
    ``max_length`` (4096 in Llama-2's config) gives way to ``max_new_tokens``. The stop tokens stay the model's
    own (Llama-3 stops at ``<|eot_id|>``, ``<|eom_id|>`` or ``<|end_of_text|>``).
    """
    return dict(do_sample=False, temperature=1.0, top_p=1.0, max_length=None, max_new_tokens=max_new_tokens, **extra)


def generate_answers(
    model,
    tokenizer,
    questions: list[str],
    system_prompt: str | list[str] = "",
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    return_finished: bool = False,
):
    """Greedy answers, one per question, prompted through the tokenizer's chat template.

    The prompt ids are ``apply_chat_template(messages, add_generation_prompt=True)``'s, as ``pipeline``,
    llama.cpp and Ollama build them; batches are padded on the left so every answer starts right after its
    prompt. Answers are decoded without special tokens. ``system_prompt``: one for all questions, or one per question
    (each asked with the system turn it was trained with, ``data.split_columns``). ``return_finished=True`` also returns, per answer,
    whether it ended with a stop token within ``max_new_tokens`` (a model that stops where it should).
    ``batch_size``: questions per ``generate()`` call, by default 8 on a GPU and 32 on a CPU (where fewer, larger
    calls are faster).
    """
    import torch

    from lora_helpers import chat

    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops, tokenizer.eos_token_id])
    systems = system_prompt if isinstance(system_prompt, (list, tuple)) else [system_prompt] * len(questions)
    batch_size = batch_size or (8 if model.device.type == "cuda" else 32)
    answers, finished = [], []
    for start in range(0, len(questions), batch_size):
        ids = [
            chat.prompt_ids(tokenizer, chat.question_messages(q, system))
            for q, system in zip(questions[start : start + batch_size], systems[start : start + batch_size])
        ]
        batch = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**batch, **greedy(max_new_tokens, pad_token_id=tokenizer.pad_token_id))
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        finished.extend(bool(stops & set(row)) for row in new_tokens.tolist())
    return (answers, finished) if return_finished else answers


def answers_cut_short(tokenizer, answers, max_new_tokens: int) -> int:
    """How many ``answers`` need more than ``max_new_tokens`` tokens, end-of-turn included: those can never match
    exactly (answers in scripts that take many tokens each, such as Chinese or Arabic, reach the limit first)."""
    return sum(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1 > max_new_tokens for answer in answers)


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after trimming white space."""
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def prompt_logits(model, prompts: list[list[int]]) -> list:
    """The logits of each prompt (a list of token ids), as fp32 CPU tensors (notebook 05 compares models)."""
    import torch

    out = []
    for ids in prompts:
        with torch.no_grad():
            out.append(model(torch.tensor([ids], device=model.device)).logits.float().cpu())
    return out


def max_difference(logits_a: list, logits_b: list) -> float:
    """Largest |a - b| over matching logit tensors."""
    return max((a - b).abs().max().item() for a, b in zip(logits_a, logits_b))


def generation_speed(model, tokenizer, prompt: list[int], new_tokens: int = 64, repeats: int = 2) -> float:
    """Generated tokens per second for one prompt (token ids), greedy, always ``new_tokens`` long (notebook 06)."""
    import time

    import torch

    batch = {"input_ids": torch.tensor([prompt], device=model.device)}
    kwargs = greedy(new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**batch, **kwargs)  # warm-up: kernels, caches
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model.generate(**batch, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return new_tokens * repeats / (time.perf_counter() - start)
