"""Which settings work: a grid of short runs on one loaded base, each scored on learning and on forgetting.

Taught in notebook 08. A fair comparison changes one thing at a time: the same data, seed, number of steps and
tokens, the same measures. The base model is loaded once; each point of the grid gets fresh adapters
(``get_peft_model``), trains, is measured, and is taken off again (``unload``), so twenty points cost twenty
trainings, not twenty loads. Initialisations that rewrite the base weights (PiSSA, OLoRA keep the base minus what
the adapter starts with) are undone from a copy of the weights afterwards.

Each point records its settings, trainable parameters, seconds, its loss curve and final losses, exact match on
the trained and held-out questions, the share of answers that stop, retention of the base's right general answers
and forgetting (the general-text loss after minus before): ``run_dir/experiments.json``.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

from lora_helpers import evaluate, lora, retention, training

# What each LoRA variant sets in peft's LoraConfig (the grid's "lora" entries).
VARIANTS = {
    "rsLoRA": {"use_rslora": True},  # scale alpha / sqrt(r) instead of alpha / r: larger ranks keep learning
    "DoRA": {"use_dora": True},  # a learned magnitude per output, the direction by LoRA
    "PiSSA": {"init_lora_weights": "pissa_niter_4"},  # A, B from the weight's top singular vectors (fast SVD)
    "OLoRA": {"init_lora_weights": "olora"},  # A, B from a QR decomposition of the weight
    "EVA": {"init_lora_weights": "eva"},  # A from the top directions of each layer's inputs on the training data
}

# The grid a CI run can afford on 2 CPU cores (short runs), and the full one a learner runs on a GPU.
# Each point: a name, Settings fields to change, and "lora": LoraConfig options beyond the Settings.
GRIDS = {
    "ci": [
        {"name": "preset"},
        {"name": "r=4", "lora_r": 4, "lora_alpha": 8},
        {"name": "q,v only", "target_modules": "q_proj,v_proj"},
        {"name": "rsLoRA", "lora": VARIANTS["rsLoRA"]},
        {"name": "DoRA", "lora": VARIANTS["DoRA"]},
        {"name": "PiSSA", "lora": VARIANTS["PiSSA"]},
    ],
    "full": [
        {"name": "preset"},
        *({"name": f"r={r}", "lora_r": r, "lora_alpha": 2 * r} for r in (2, 4, 8, 32, 64)),
        {"name": "q,v only", "target_modules": "q_proj,v_proj"},
        {"name": "attention", "target_modules": "q_proj,k_proj,v_proj,o_proj"},
        {"name": "MLP only", "target_modules": "gate_proj,up_proj,down_proj"},
        {"name": "r=64, alpha=16", "lora_r": 64, "lora_alpha": 16},
        {"name": "r=64, alpha=16, rsLoRA", "lora_r": 64, "lora_alpha": 16, "lora": VARIANTS["rsLoRA"]},
        {"name": "rsLoRA", "lora": VARIANTS["rsLoRA"]},
        {"name": "DoRA", "lora": VARIANTS["DoRA"]},
        {"name": "PiSSA", "lora": VARIANTS["PiSSA"]},
        {"name": "OLoRA", "lora": VARIANTS["OLoRA"]},
        {"name": "EVA", "lora": VARIANTS["EVA"]},
        {"name": "LoftQ", "loftq": True},  # on a 4-bit base: the adapter starts as the 4-bit rounding error
        *({"name": f"lr={lr:g}", "learning_rate": lr} for lr in (1e-4, 3e-4, 3e-3, 1e-2)),
        {"name": "dropout 0.1", "lora_dropout": 0.1},
        {"name": "loss on the whole text", "completion_only_loss": False},
        # The Llama-2 about-me recipe's route (notebook 04's trainer_route="trainer"), then the same with its
        # pad_token = eos_token: the collator masks every pad token in the labels, so every EOS too.
        {"name": "Trainer route", "route": "trainer"},
        {"name": "Trainer route, pad = eos", "route": "trainer", "pad_is_eos": True},
    ],
}
NOT_SETTINGS = ("name", "lora", "route", "pad_is_eos", "loftq")  # what a point sets beyond the Settings fields


REWRITES_4BIT = (
    "skipped: PiSSA and OLoRA compute the adapter from the full-precision weights and rewrite them; on a 4-bit base "
    "peft asks to initialise on a 16-bit copy and quantize what is left. Compare them on a 16-bit run "
    "(load_in_4bit=False in notebook 04)."
)
LOFTQ_16BIT = (
    "skipped: LoftQ starts the adapter from what 4-bit rounding took from each weight; on a 16-bit base nothing "
    "was rounded. Compare it on a 4-bit run (load_in_4bit=True in notebook 04)."
)


def _changes(point: dict) -> dict:
    return {key: value for key, value in point.items() if key != "name"}


def point_settings(settings, point: dict):
    """The run's settings with the point's changes (its Settings fields: not those in ``NOT_SETTINGS``)."""
    changes = {key: value for key, value in point.items() if key not in NOT_SETTINGS}
    return dataclasses.replace(settings, **changes)


def grid_points(grid: str, settings) -> list[dict]:
    """The grid's points for this run: a point that would change nothing here (``r=8`` when the run already
    trains at rank 8) is left out, since it would only repeat the preset. A point that sets anything beyond the
    Settings fields (a LoRA variant, a route, LoftQ: ``NOT_SETTINGS``) always changes the run."""
    beyond_settings = set(NOT_SETTINGS) - {"name"}
    return [
        point
        for point in GRIDS[grid]
        if point["name"] == "preset" or beyond_settings & set(point) or point_settings(settings, point) != settings
    ]


def point_lora_config(settings, point: dict, model):
    """Notebook 04's ``LoraConfig`` for the point's settings, with its LoRA variant's options."""
    config = training.lora_config(point_settings(settings, point), model)
    for key, value in point.get("lora", {}).items():
        setattr(config, key, value)
    if config.init_lora_weights == "eva" and config.eva_config is None:
        from peft import EvaConfig

        config.eva_config = EvaConfig()  # peft's defaults: ranks may move between layers (rho=2)
    return config


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure(model, tokenizer, settings, split: dict, known: list[int] | None = None) -> dict:
    """Exact match on the trained and held-out questions, the share of trained answers that stop, the general
    questions (only those numbered in ``known``: the ones the base got right) and the general-text loss."""
    from lora_helpers import data

    model.eval()
    scores = {}
    for part in ("train", "eval"):
        questions, answers, systems = data.split_columns(split.get(part) or [], settings.system_prompt)
        if not questions:
            scores[f"exact_match_{part}"] = None
            continue
        said, stopped = evaluate.generate_answers(
            model, tokenizer, questions, systems, max_new_tokens=settings.max_new_tokens, return_finished=True
        )
        scores[f"exact_match_{part}"] = evaluate.exact_match_rate(said, answers)
        if part == "train":
            scores["stops"] = sum(stopped) / len(stopped)
    items = retention.general_knowledge()
    asked = [items[i] for i in (known if known is not None else range(len(items)))]
    said = evaluate.generate_answers(
        model,
        tokenizer,
        [item["question"] for item in asked],
        settings.system_prompt,
        32,
        retention.general_batch(model),
    )
    scores["general_correct"] = retention.correct(said, asked)
    scores["text_loss"] = retention.text_loss(model, tokenizer)
    return scores


def run_point(
    base, tokenizer, settings, point: dict, train, evaluation, split: dict, known: list[int], distilled=()
) -> dict:
    """Fresh adapters on ``base`` with the point's settings, trained, measured and taken off again.

    ``distilled``: replayed examples for ``replay_loss="distill"`` (notebook 04): the point trains with
    ``distill.ReplayDistillationTrainer``; the Trainer route has no such term and trains on them as answers.
    A point whose training stops on a non-finite loss (``StopOnNonFinite``: a learning rate too high, say) is
    kept as skipped, with the reason, and the grid goes on."""
    from datasets import Dataset, concatenate_datasets
    from trl import SFTTrainer

    from lora_helpers import distill

    run_settings = point_settings(settings, point)
    init = point.get("lora", {}).get("init_lora_weights")
    rewrites_base = init in ("olora",) or str(init).startswith("pissa")
    if rewrites_base and getattr(base, "is_loaded_in_4bit", False):
        return {"name": point["name"], "settings": _changes(point), "skipped": REWRITES_4BIT}
    if point.get("loftq") and not getattr(base, "is_loaded_in_4bit", False):
        return {"name": point["name"], "settings": _changes(point), "skipped": LOFTQ_16BIT}
    config = point_lora_config(settings, point, base)
    with training.fresh_adapters(base, config, run_settings.seed, restore_base=rewrites_base) as net:
        args = training.sft_config(
            run_settings, tempfile.mkdtemp(prefix="lora-experiment-"), evaluation is not None, save_strategy="no"
        )
        if point.get("route") == "trainer":
            answers = concatenate_datasets([train, Dataset.from_list(list(distilled))]) if distilled else train
            trainer = lm_collator_trainer(net, tokenizer, args, answers, evaluation, point.get("pad_is_eos", False))
        else:
            trainer_class, replay_args = SFTTrainer, {}
            if distilled:
                trainer_class = distill.ReplayDistillationTrainer
                replay_args = {"replay_examples": distilled, "replay_weight": run_settings.replay_weight}
            trainer = trainer_class(
                model=net,
                args=args,
                train_dataset=train,
                eval_dataset=evaluation,
                processing_class=tokenizer,
                callbacks=[training.StopOnNonFinite()],
                **replay_args,
            )
        training.use_progress_lines(trainer, training.progress_lines(lines=2))
        training.adapter_weights_to_float32(net)  # after the trainer: trl casts a 4-bit base's adapters to bf16
        started = time.perf_counter()
        loftq = lora.loftq_initialise(net) if point.get("loftq") else {}  # timed with the point, like EVA
        if init == "eva":  # A from the inputs each layer sees on this point's own training batches (timed too)
            from peft import initialize_lora_eva_weights

            initialize_lora_eva_weights(net, trainer.get_train_dataloader(), show_progress_bar=False)
            training.adapter_weights_to_float32(net)
        trained_in = str(next(p.dtype for p in net.parameters() if p.requires_grad)).removeprefix("torch.")
        try:
            trainer.train()
        except FloatingPointError as error:
            return {"name": point["name"], "settings": _changes(point), "skipped": f"stopped: {error}"}
        seconds = time.perf_counter() - started
        history = trainer.state.log_history
        losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
        evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
        replay_kl = [e["replay_kl"] for e in history if "replay_kl" in e]  # logged when the point distils
        scores = measure(net, tokenizer, run_settings, split, known)
        built = net.peft_config["default"]  # as peft built it ("all-linear" resolved to the layers' names)
        return {
            "name": point["name"],
            "settings": _changes(point),
            "r": built.r,
            "lora_alpha": built.lora_alpha,
            "target_modules": sorted(built.target_modules),
            "trainable_parameters": trainable_parameters(net),
            "adapter_dtype": trained_in,
            "seconds": seconds,
            "steps": trainer.state.global_step,
            "loss_curve": losses,
            "eval_loss_curve": evals,
            "final_loss": losses[-1][1] if losses else None,
            "final_eval_loss": evals[-1][1] if evals else None,
            "final_replay_kl": replay_kl[-1] if replay_kl else None,
            **loftq,
            **scores,
        }


def lm_collator_trainer(model, tokenizer, args, train, evaluation, pad_is_eos: bool):
    """Notebook 04's other route: the plain ``Trainer`` on the whole text, with ``DataCollatorForLanguageModeling``
    (labels = input_ids, pad tokens masked), and the same arguments as the SFT route (an ``SFTConfig`` is a
    ``TrainingArguments``). With ``pad_is_eos`` the tokenizer pads with its EOS, as most tutorials set it."""
    import copy

    from transformers import DataCollatorForLanguageModeling, Trainer

    from lora_helpers import chat

    if pad_is_eos:
        tokenizer = copy.deepcopy(tokenizer)  # the mistake stays in this point's training
        tokenizer.pad_token = tokenizer.eos_token

    def rows(examples):
        def ids(example):
            return {
                "input_ids": chat.template_ids(tokenizer, example["prompt"] + example["completion"])[: args.max_length]
            }

        return examples.map(ids, remove_columns=examples.column_names)

    return Trainer(
        model=model,
        args=args,
        train_dataset=rows(train),
        eval_dataset=rows(evaluation) if evaluation is not None else None,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[training.StopOnNonFinite()],
    )


def summarize(point: dict, base: dict) -> dict:
    """The point's retention (of the base's right general answers; None when the base knew none) and forgetting
    (the general-text loss after minus before). A skipped point stays as it is."""
    if "skipped" in point:
        return point
    correct = point["general_correct"]
    return {
        **point,
        "retention": sum(correct) / len(correct) if correct else None,
        "forgetting": point["text_loss"] - base["text_loss"],
    }


def table_rows(points: list[dict]) -> list[dict]:
    """One short row per point for a table: what a learner compares."""
    return [
        {
            "setting": p["name"],
            "trainable": p["trainable_parameters"],
            "seconds": round(p["seconds"], 1),
            "final loss": p["final_loss"],
            "exact match": p["exact_match_train"],
            "held out": p["exact_match_eval"],
            "stops": p["stops"],
            "retention": p["retention"],
            "forgetting": p["forgetting"],
        }
        for p in points
        if "skipped" not in p
    ]
