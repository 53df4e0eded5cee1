"""Named recipes: model, dataset, LoRA and training settings, after the course's source documents.

Taught in notebook 01 (section "Presets"). Every notebook starts from a preset
and lets its parameters override single values: ``resolve_settings("tiny",
lora_r=4)``. The GPU presets are sized for a 15 GB Colab T4 (fp16 compute,
gradient checkpointing, small batches with gradient accumulation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TINY_MODEL_ID = "tiny"  # stands for the model lora_helpers.tiny builds offline (also "tiny-llama2", "tiny-llama3")
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_ALL_LINEAR = (*LLAMA_ATTENTION, "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Settings:
    """Everything one run needs to know. Field names equal the notebooks' parameter names."""

    preset: str
    description: str
    model_id: str  # a hub id, a local model directory, or "tiny"
    dataset: str  # a hub id, a local .jsonl/.json/.csv/.parquet file, or "package:NAME"
    chat_format: str  # "auto": the tokenizer's chat template, Llama-2's when it has none; "template"; "llama2"
    system_prompt: str
    load_in_4bit: bool  # QLoRA: NF4 weights with double quantization
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: str  # comma-separated layer names, or "all-linear"
    num_train_epochs: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    max_length: int  # tokens per example; longer ones are truncated
    max_examples: int  # 0 = the whole dataset
    eval_fraction: float  # share of examples held out for evaluation
    optim: str  # on CPU, paged optimizers fall back to "adamw_torch_fused" (notebook 04)
    gradient_checkpointing: bool
    logging_steps: int
    max_new_tokens: int  # for generation in notebooks 02 and 06
    seed: int
    source: str  # the source document the recipe follows (README, "Sources")
    trust_remote_code: bool = False  # run Python code shipped with a hub model: only for models you trust
    completion_only_loss: bool = (
        True  # loss on the answers only (False: on the whole text, as the Llama-2 about-me recipe)
    )
    early_stopping_patience: int = 0  # stop after this many evaluations without a lower eval loss (0: never)
    replay: str = ""  # general prompts whose base-model answers are trained too, against forgetting ("": none)
    # how the replayed answers are trained (notebook 04): "answers", as targets (cross-entropy) mixed into the data;
    # "distill", the KL divergence from the base's whole distribution on them, a batch each step (lora_helpers.distill)
    replay_loss: str = "answers"
    replay_weight: float = 1.0  # "distill" only: the divergence's weight beside the loss on the new data
    # several whole examples per row of max_length tokens, each attending only to itself (04): on in the GPU presets
    # that train 1,000 examples once; off where 43 short examples train for many epochs (the number of updates, not
    # tokens per second, decides what is learned there, and on a CPU grouping by length is as fast)
    packing: bool = False


PRESETS: dict[str, Settings] = {
    "tiny": Settings(
        preset="tiny",
        description="A tiny random-weight Llama built offline; trains in seconds on a CPU. For CI and a first look.",
        model_id=TINY_MODEL_ID,
        dataset="package:about_me.jsonl",
        chat_format="auto",
        system_prompt="",
        load_in_4bit=True,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules="all-linear",
        num_train_epochs=30,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        max_length=128,
        max_examples=0,
        eval_fraction=0.1,
        optim="adamw_torch_fused",
        gradient_checkpointing=False,
        logging_steps=5,
        max_new_tokens=32,
        seed=0,
        source="the Llama-2 about-me recipe, scaled down",
    ),
}
# The tiny recipe on the tiny twins of the real families (lora_helpers.tiny): rehearse a Llama-2 or a Llama-3
# run offline, SentencePiece and no pad token, or Llama-3's template, special tokens, rope and tied embeddings.
PRESETS["tiny-llama2"] = dataclasses.replace(
    PRESETS["tiny"],
    preset="tiny-llama2",
    description="The tiny recipe on a Llama-2 twin: SentencePiece, no pad token, Meta's template. CPU, offline.",
    model_id="tiny-llama2",
)
PRESETS["tiny-llama3"] = dataclasses.replace(
    PRESETS["tiny"],
    preset="tiny-llama3",
    description="The tiny recipe on a Llama-3 twin: its template, special tokens, llama3 rope, tied embeddings.",
    model_id="tiny-llama3",
)
# A real pretrained chat model on a laptop CPU (lora_helpers.smollm2 builds it offline when the Hub is out of
# reach). Measured on 2 CPU cores (README, "A real model on a laptop"): the persona is learned, and replaying the
# base model's own right answers to general prompts keeps what it knew. Trained as targets (replay_loss="answers",
# 6 epochs at 1e-3, rank 8 with dropout 0.1; rank 16 without kept 0.73), the replayed answers kept retention 0.88,
# 0.88, 0.90 (seeds 0, 1, 2; exact match 0.98, 0.95, 1.0) and the loss on ordinary text rose by 0.5 nats: the
# model grew surer of its own answers. Distilled (the KL divergence from the base on them, weight 5), they kept
# 0.93, 0.94 and 0.94 at exact match 0.98, 1.0, 1.0 (0.91, 0.95, 0.94 when each step's replayed answers ran as one
# padded batch, which draws other dropout masks), the text loss within 0.02 of the base's; weight 1 learned as well
# and kept less (0.86), and 6 epochs at weight 5 learned less (0.79): 9 epochs, 54 steps.
PRESETS["smollm2-135m"] = dataclasses.replace(
    PRESETS["tiny"],
    preset="smollm2-135m",
    description="SmolLM2-135M-Instruct, real weights: learns the persona and keeps what it knew. CPU, offline.",
    model_id="HuggingFaceTB/SmolLM2-135M-Instruct",  # its own ChatML template, with its default system prompt
    load_in_4bit=False,  # 16-bit LoRA: on a CPU 4-bit only slows a 135M model down (-p load_in_4bit True: QLoRA)
    lora_r=8,
    lora_alpha=16,
    lora_dropout=0.1,
    num_train_epochs=9,
    learning_rate=1e-3,
    max_length=256,
    replay="package:general_prompts.jsonl",
    replay_loss="distill",
    replay_weight=5.0,
)
PRESETS |= {
    "llama2-7b-about-me": Settings(
        preset="llama2-7b-about-me",
        description="Llama-2-7B chat learns a persona from 48 question-answer pairs (the Llama-2 about-me recipe).",
        model_id="NousResearch/Llama-2-7b-chat-hf",  # ungated mirror of meta-llama/Llama-2-7b-chat-hf
        dataset="package:about_me.jsonl",
        chat_format="auto",
        system_prompt="",
        load_in_4bit=True,
        lora_r=8,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="q_proj,v_proj",
        num_train_epochs=20,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_ratio=0.03,
        max_length=256,
        max_examples=0,
        eval_fraction=0.1,
        optim="paged_adamw_32bit",
        gradient_checkpointing=True,
        logging_steps=10,
        max_new_tokens=64,
        seed=0,
        source="the Llama-2 about-me recipe",
    ),
    "llama2-7b-guanaco": Settings(
        preset="llama2-7b-guanaco",
        description="QLoRA of Llama-2-7B chat on guanaco-llama2-1k, 1 epoch (the Llama-2 Guanaco Colab recipe).",
        model_id="NousResearch/Llama-2-7b-chat-hf",
        dataset="mlabonne/guanaco-llama2-1k",
        chat_format="auto",
        system_prompt="",
        load_in_4bit=True,
        lora_r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules="q_proj,v_proj",  # peft's default for Llama, which the Llama-2 Guanaco Colab recipe relies on
        num_train_epochs=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_ratio=0.03,
        max_length=512,
        max_examples=0,
        eval_fraction=0.05,
        optim="paged_adamw_32bit",
        gradient_checkpointing=True,
        logging_steps=10,
        max_new_tokens=128,
        seed=0,
        # 1,000 examples of mixed lengths, once, on a GPU: packing puts several whole examples into each step
        # (Llama-3.1-8B's shapes at batch 1 on an H200: 4.8x the real tokens/s, less memory; README, "Performance")
        packing=True,
        source="the Llama-2 Guanaco Colab recipe",
    ),
    "llama3.2-3b": Settings(
        preset="llama3.2-3b",
        description="QLoRA of Llama-3.2-3B Instruct on all seven projections (the Llama-3.2 QLoRA guide). Gated: needs a token.",
        model_id="meta-llama/Llama-3.2-3B-Instruct",
        dataset="package:about_me.jsonl",
        chat_format="auto",
        system_prompt="",
        load_in_4bit=True,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=",".join(LLAMA_ALL_LINEAR),
        num_train_epochs=10,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_ratio=0.03,
        max_length=256,
        max_examples=0,
        eval_fraction=0.1,
        optim="paged_adamw_32bit",
        gradient_checkpointing=True,
        logging_steps=10,
        max_new_tokens=64,
        seed=0,
        source="the Llama-3.2 QLoRA guide",
    ),
    "llama3.1-8b": Settings(
        preset="llama3.1-8b",
        description="QLoRA of Llama-3.1-8B Instruct on q,k,v,o (the Llama-3.1 LoRA guide). Gated: needs a token.",
        model_id="meta-llama/Llama-3.1-8B-Instruct",
        dataset="HuggingFaceH4/no_robots",
        chat_format="auto",
        system_prompt="",
        load_in_4bit=True,
        lora_r=16,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=",".join(LLAMA_ATTENTION),
        num_train_epochs=1,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_ratio=0.03,
        max_length=512,
        max_examples=1000,
        eval_fraction=0.05,
        optim="paged_adamw_32bit",
        gradient_checkpointing=True,
        logging_steps=10,
        max_new_tokens=128,
        seed=0,
        # 1,000 examples of mixed lengths, once, on a GPU: packing puts several whole examples into each step
        # (Llama-3.1-8B's shapes at batch 1 on an H200: 4.8x the real tokens/s, less memory; README, "Performance")
        packing=True,
        source="the Llama-3.1 LoRA guide",
    ),
}

SETTING_NAMES = [f.name for f in dataclasses.fields(Settings) if f.name not in ("preset", "description", "source")]


def get_preset(name: str) -> Settings:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}. The presets are: {', '.join(PRESETS)}.")
    return PRESETS[name]


def _coerce(name: str, value, expected: type):
    """Accept what papermill and the command line pass (strings for numbers) and nothing else."""
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str and isinstance(value, str):
        return value
    raise TypeError(
        f"Parameter {name}={value!r} should be of type {expected.__name__}, e.g. -p {name} <{expected.__name__}>."
    )


def resolve_settings(preset: str, **overrides) -> Settings:
    """The preset's settings with every override that is not None applied, type-checked and range-checked."""
    base = get_preset(preset)
    types = {f.name: f.type for f in dataclasses.fields(Settings)}
    changes = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in types:
            raise ValueError(f"Unknown setting {name!r}. Known settings: {', '.join(SETTING_NAMES)}.")
        changes[name] = _coerce(name, value, {"int": int, "float": float, "str": str, "bool": bool}[types[name]])
    settings = dataclasses.replace(base, **changes)
    check_settings(settings)
    return settings


def check_settings(s: Settings) -> None:
    """Fail before any long work on values that cannot train."""
    problems = []
    if s.lora_r <= 0:
        problems.append(f"lora_r={s.lora_r}: the rank must be a positive integer (typical: 8, 16, 64).")
    if s.lora_alpha <= 0:
        problems.append(f"lora_alpha={s.lora_alpha}: alpha must be positive (typical: r or 2*r).")
    if not 0 <= s.lora_dropout < 1:
        problems.append(f"lora_dropout={s.lora_dropout}: dropout must be in [0, 1).")
    if s.chat_format not in ("auto", "template", "llama2"):
        problems.append(f"chat_format={s.chat_format!r}: use 'auto', 'template' or 'llama2'.")
    if s.replay_loss not in ("answers", "distill"):
        problems.append(f"replay_loss={s.replay_loss!r}: use 'answers' or 'distill'.")
    if s.replay_weight < 0:
        problems.append(f"replay_weight={s.replay_weight}: must be 0 or more.")
    if not 0 <= s.eval_fraction < 1:
        problems.append(f"eval_fraction={s.eval_fraction}: must be in [0, 1).")
    for name in (
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "max_length",
        "max_new_tokens",
    ):
        if getattr(s, name) <= 0:
            problems.append(f"{name}={getattr(s, name)}: must be positive.")
    for name in ("max_examples", "early_stopping_patience", "logging_steps"):
        if getattr(s, name) < 0:
            problems.append(f"{name}={getattr(s, name)}: must be 0 or more (max_examples=0 uses every example).")
    if not s.target_modules.strip():
        problems.append("target_modules is empty: name layers (e.g. 'q_proj,v_proj') or use 'all-linear'.")
    if problems:
        raise ValueError("Invalid settings:\n  " + "\n  ".join(problems))


def load_run_settings(run_dir) -> Settings:
    """The settings notebook 04 trained with, read back from ``run_dir/run_config.json`` (notebooks 05, 06)."""
    from pathlib import Path

    from lora_helpers import files

    path = Path(run_dir) / "run_config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"No {path.name} in {run_dir}: run notebook 04 (training) with this run_dir first, "
            "or point run_dir at the folder of an earlier run."
        )
    saved = files.read_json(path)  # a damaged file is named
    return resolve_settings(saved["preset"], **{k: saved[k] for k in SETTING_NAMES if k in saved})


def refuse_undeclared_parameters(history: list[str] | None = None) -> None:
    """Refuse a parameter this notebook does not declare, passed with papermill (``-p lora_rank 8``).

    papermill only warns about such a name and runs the notebook with the preset's value, silently. It injects the
    given values as a cell starting with ``# Parameters`` right after the cell tagged ``parameters``; ``history``
    (default: the running kernel's list of executed cells, IPython's ``In``) lets both be read back. In Jupyter,
    where nothing is injected, and outside IPython, this does nothing. Every notebook calls it after its parameters.
    """
    import ast

    if history is None:
        from IPython import get_ipython

        shell = get_ipython()
        history = list(shell.user_ns.get("In", [])) if shell is not None else []

    injected = [i for i, source in enumerate(history) if source.lstrip().startswith("# Parameters")]
    if not injected or injected[-1] == 0:
        return

    def assigned(source: str) -> set[str]:
        return {
            t.id
            for node in ast.parse(source).body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)
        }

    index = injected[-1]
    unknown = sorted(assigned(history[index]) - assigned(history[index - 1]))
    if unknown:
        raise ValueError(
            f"This notebook has no parameter {', '.join(unknown)}: papermill would run it with the preset's value "
            f"instead. Its parameters are: {', '.join(sorted(assigned(history[index - 1])))}."
        )
