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
answers (the divergence, times ``replay_weight``), so the persona alone decides the number of steps.
"""

from __future__ import annotations

import random

import torch
from trl import SFTTrainer

from lora_helpers import data


def kl_to_base(model, input_ids, attention_mask, answer_mask, peft_model=None) -> torch.Tensor:
    """Mean KL(base || model), in nats per answer token, over the positions where ``answer_mask`` is True.

    ``model`` is a peft model (or DDP's wrapper of one, then ``peft_model`` is the model inside); the base is the
    same model inside ``disable_adapter()``, without gradients. ``answer_mask[i, t]`` marks the positions whose
    logits predict an answer token (the answer's tokens moved one to the left). The divergence is computed on the
    whole vocabulary, in float32.
    """
    peft_model = peft_model if peft_model is not None else model
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits[answer_mask]
        base = base.float().log_softmax(-1)
    tuned = model(input_ids=input_ids, attention_mask=attention_mask).logits[answer_mask].float().log_softmax(-1)
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

    def next_replay_batch(self) -> dict:
        """The next ``per_device_train_batch_size`` replayed answers, as a batch on the model's device."""
        size = min(self.args.per_device_train_batch_size, len(self.replay_rows))
        if len(self._replay_order) < size:  # a new pass over the replayed answers, in a new order
            order = list(range(len(self.replay_rows)))
            self._replay_random.shuffle(order)
            self._replay_order += order
        picked, self._replay_order = self._replay_order[:size], self._replay_order[size:]
        batch = replay_batch([self.replay_rows[i] for i in picked], self.processing_class.pad_token_id)
        return {name: tensor.to(self.model.device) for name, tensor in batch.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        kl = kl_to_base(model, **self.next_replay_batch(), peft_model=self.accelerator.unwrap_model(model))
        self._metrics["train"]["replay_kl"].append(float(kl.detach()))
        # As SFTTrainer does with an auxiliary loss: when the loss is already a share of the whole accumulated
        # batch (num_items_in_batch), the trainer no longer divides by the accumulation steps, so this term must.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        extra = self.replay_weight * kl / steps
        return (result[0] + extra, result[1]) if return_outputs else result + extra
