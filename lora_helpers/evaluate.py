"""Greedy answers and exact match: did the model learn the answers?

Taught in notebook 06 (section "Did it learn?"); notebook 04 uses it for a first check.
"""

from __future__ import annotations

from lora_helpers import data


def generate_answers(
    model,
    tokenizer,
    questions: list[str],
    chat_format: str,
    system_prompt: str = "",
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers, one per question, decoded without special tokens.

    Prompts are padded on the left so every answer starts right after its own prompt.
    """
    import torch

    answers = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(questions), batch_size):
            prompts = [
                data.prompt_for_generation(q, tokenizer, chat_format, system_prompt)
                for q in questions[start : start + batch_size]
            ]
            batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return answers


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after trimming white space."""
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def prompt_logits(model, tokenizer, prompts: list[str]) -> list:
    """The logits of each prompt, as fp32 CPU tensors (notebook 05 compares models with them)."""
    import torch

    out = []
    for prompt in prompts:
        batch = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out.append(model(**batch).logits.float().cpu())
    return out


def max_difference(logits_a: list, logits_b: list) -> float:
    """Largest |a - b| over matching logit tensors."""
    return max((a - b).abs().max().item() for a, b in zip(logits_a, logits_b))


def max_logit_difference(model_a, model_b, tokenizer, prompts: list[str]) -> float:
    """Largest |logit_a - logit_b| over the prompts' tokens: notebook 05's check that a merge changed nothing."""
    return max_difference(prompt_logits(model_a, tokenizer, prompts), prompt_logits(model_b, tokenizer, prompts))


def generation_speed(model, tokenizer, prompt: str, new_tokens: int = 64, repeats: int = 2) -> float:
    """Generated tokens per second for one prompt, greedy, always ``new_tokens`` long (notebook 06)."""
    import time

    import torch

    batch = tokenizer(prompt, return_tensors="pt").to(model.device)
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
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
