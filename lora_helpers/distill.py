"""Replay by distillation: hold the model to the base's whole next-token distribution on the replayed answers.

Taught in notebook 04 (section "Replay: answers or distributions"). Replay as the course first teaches it
(``replay_loss="answers"``) trains the base's greedy answers as ordinary targets, with cross-entropy: each token the
base picked is pushed towards probability 1. That sharpens the model (measured on SmolLM2: the mean entropy on
held-out answers fell from 0.89 to 0.44 nats when it was trained on its own 89 answers alone) and its loss on
ordinary text rises by half a nat. ``replay_loss="distill"`` keeps the same prompts and answers, but grades the
adapter on the KL divergence from the base's distribution at every answer token, the base being the same network
with its adapter switched off (``model.disable_adapter()``): no second model in memory, and a divergence of 0 while
the adapter is still zero. This is "learning without forgetting" (Li and Hoiem, 2016) on the base's own answers.

Each optimizer step then takes one batch of the persona data (cross-entropy, as ever) and one batch of replayed
answers (the divergence, times ``replay_weight``), so the persona alone decides the number of steps. Three things
keep that second batch cheap without changing what is computed: the base never changes, so its log-probabilities on
each replayed answer are computed the first time the answer is drawn and kept; only the answer positions go
through the LM head (a boolean ``logits_to_keep``), not the prompts and padding around them; and the batch runs as
two halves of similar lengths, each padded to its own longest row rather than all to the longest of the eight.
"""

from __future__ import annotations

import random

import torch
from trl import SFTTrainer

from lora_helpers import data

BASE_CACHE_BYTES = 2 * 2**30  # the most the trainer keeps of the base's log-probabilities (CPU memory)
REPLAY_GROUPS = 2  # each step's replayed answers run as this many batches of similar lengths (less padding)


def answer_log_probs(model, input_ids, attention_mask, answer_mask) -> torch.Tensor:
    """The model's log-probabilities at the answer positions alone: a float32 ``(answer tokens, vocabulary)`` tensor,
    rows in the mask's order (row by row). The LM head runs only where ``answer_mask`` is True (transformers'
    ``logits_to_keep`` as a boolean mask): on a replay batch that is about a quarter of the positions, the rest
    being prompts and padding, and the LM head of a small model is a fifth of its arithmetic."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=answer_mask).logits
    if logits.dim() == 3:  # a model that ignores logits_to_keep returns every position
        logits = logits[answer_mask]
    return logits.float().log_softmax(-1)


def base_log_probs(peft_model, input_ids, attention_mask, answer_mask) -> torch.Tensor:
    """``answer_log_probs`` of the base: the same network inside ``disable_adapter()``, without gradients."""
    with torch.no_grad(), peft_model.disable_adapter():
        return answer_log_probs(peft_model, input_ids, attention_mask, answer_mask)


def kl_to_base(model, input_ids, attention_mask, answer_mask, peft_model=None, base=None) -> torch.Tensor:
    """Mean KL(base || model), in nats per answer token, over the positions where ``answer_mask`` is True.

    ``model`` is a peft model (or DDP's wrapper of one, then ``peft_model`` is the model inside); the base is the
    same model inside ``disable_adapter()``, without gradients, unless ``base`` already holds its
    ``base_log_probs`` on this batch (the trainer computes them once per replayed answer: the base never changes).
    ``answer_mask[i, t]`` marks the positions whose logits predict an answer token (the answer's tokens moved one
    to the left). The divergence is computed on the whole vocabulary, in float32.
    """
    peft_model = peft_model if peft_model is not None else model
    if base is None:
        base = base_log_probs(peft_model, input_ids, attention_mask, answer_mask)
    tuned = answer_log_probs(model, input_ids, attention_mask, answer_mask)
    return (base.exp() * (base - tuned)).sum(-1).mean()


def replay_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """``(prompt_ids, answer_ids)`` pairs as one right-padded batch: ``input_ids``, ``attention_mask`` and
    ``answer_mask`` (the positions whose logits predict an answer token)."""
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, answer) in enumerate(rows):
        end = len(prompt) + len(answer)
        input_ids[i, :end] = torch.tensor(prompt + answer)
        attention_mask[i, :end] = 1
        answer_mask[i, len(prompt) - 1 : end - 1] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask}


class ReplayDistillationTrainer(SFTTrainer):
    """``SFTTrainer`` whose training loss adds ``replay_weight`` times the KL divergence from the base on one
    batch of replayed answers per step (``retention.replay_examples``' prompt/completion examples).

    The replayed examples are drawn in a shuffled order (seeded by ``args.seed``), one batch of
    ``per_device_train_batch_size`` at a time, and the divergence is logged as ``replay_kl``. Evaluation is
    ``SFTTrainer``'s own: the eval loss stays comparable with a run without replay.
    """

    def __init__(self, *args, replay_examples=(), replay_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not replay_examples:
            raise ValueError("ReplayDistillationTrainer needs replay examples: use SFTTrainer when replay is off.")
        tokenizer = self.processing_class
        self.replay_rows = [data.token_ids(example, tokenizer) for example in replay_examples]
        self.replay_rows = [(p, a[: max(1, self.args.max_length - len(p))]) for p, a in self.replay_rows]
        self.replay_weight = replay_weight
        self._replay_order: list[int] = []
        self._replay_random = random.Random(self.args.seed)
        # The base's log-probabilities on each replayed answer, computed the first time it is drawn (each is drawn
        # once per pass over the replay, about five times in the SmolLM2 preset's run), kept in float32 on the CPU:
        # SmolLM2's 89 answers take 0.5 GB. Past BASE_CACHE_BYTES (a large vocabulary, long answers) the base runs
        # on every batch instead.
        vocabulary = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
        answer_tokens = sum(len(answer) for _, answer in self.replay_rows)
        self._base_cache: dict[int, torch.Tensor] | None = (
            {} if answer_tokens * vocabulary * 4 <= BASE_CACHE_BYTES else None
        )

    def next_replay_indices(self) -> list[int]:
        """The next ``per_device_train_batch_size`` replayed answers (indices into ``replay_rows``)."""
        size = min(self.args.per_device_train_batch_size, len(self.replay_rows))
        if len(self._replay_order) < size:  # a new pass over the replayed answers, in a new order
            order = list(range(len(self.replay_rows)))
            self._replay_random.shuffle(order)
            self._replay_order += order
        picked, self._replay_order = self._replay_order[:size], self._replay_order[size:]
        return picked

    def replay_batch_of(self, picked: list[int]) -> dict:
        """The replayed answers ``picked``, as one batch on the model's device."""
        batch = replay_batch([self.replay_rows[i] for i in picked], self.processing_class.pad_token_id)
        return {name: tensor.to(self.model.device) for name, tensor in batch.items()}

    def cached_base_log_probs(self, picked: list[int], peft_model) -> torch.Tensor:
        """``base_log_probs`` on the replayed answers ``picked``, in order: the base runs once, on those not seen yet."""
        missing = [i for i in dict.fromkeys(picked) if i not in self._base_cache]
        if missing:
            log_probs = base_log_probs(peft_model, **self.replay_batch_of(missing))
            sizes = [len(self.replay_rows[i][1]) for i in missing]
            self._base_cache.update(zip(missing, (part.cpu() for part in log_probs.split(sizes))))
        return torch.cat([self._base_cache[i] for i in picked]).to(self.model.device)

    def length_groups(self, picked: list[int]) -> list[list[int]]:
        """``picked`` sorted by length and cut into ``REPLAY_GROUPS`` groups, each run as its own padded batch:
        replayed answers vary in length (SmolLM2's rows: 44 to 124 tokens), and one batch padded to its longest row
        is about a third padding. The divergence is the same mean (``replay_divergence``); only the dropout masks
        drawn differ. Measured on SmolLM2 (2 cores, batches of 8): the divergence's forward and backward pass take
        0.70 of the time of one padded batch (medians of 8, interleaved), two epochs of the preset's training 0.77."""
        ordered = sorted(picked, key=lambda i: sum(map(len, self.replay_rows[i])))
        size = -(-len(ordered) // REPLAY_GROUPS)  # rounded up
        return [ordered[start : start + size] for start in range(0, len(ordered), size)]

    def replay_divergence(self, model, picked: list[int]) -> torch.Tensor:
        """``kl_to_base`` on the replayed answers ``picked``, run as ``length_groups``: each group's mean weighted
        by its share of the answer tokens, so the result is the mean over all of them, as one batch would give it."""
        peft_model = self.accelerator.unwrap_model(model)
        answer_tokens = sum(len(self.replay_rows[i][1]) for i in picked)
        kl = 0.0
        for group in self.length_groups(picked):
            base = self.cached_base_log_probs(group, peft_model) if self._base_cache is not None else None
            share = sum(len(self.replay_rows[i][1]) for i in group) / answer_tokens
            kl = kl + share * kl_to_base(model, **self.replay_batch_of(group), peft_model=peft_model, base=base)
        return kl

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        kl = self.replay_divergence(model, self.next_replay_indices())
        self._metrics["train"]["replay_kl"].append(float(kl.detach()))
        # As SFTTrainer does with an auxiliary loss: when the loss is already a share of the whole accumulated
        # batch (num_items_in_batch), the trainer no longer divides by the accumulation steps, so this term must.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        extra = self.replay_weight * kl / steps
        return (result[0] + extra, result[1]) if return_outputs else result + extra
