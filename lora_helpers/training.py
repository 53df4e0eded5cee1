"""The training recipe of notebook 04, for reuse once it has been taught.

Notebook 04 writes every call out (``LoraConfig``, ``SFTConfig``, ``SFTTrainer``);
notebook 06 and the tests call ``train_adapter`` here to train a second adapter
the same way, as d2l does with functions taught in earlier chapters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

from datasets import Dataset, concatenate_datasets
from transformers import TrainerCallback

from lora_helpers import data, device, files, plots, process, retention


def precision_flags() -> dict:
    """``fp16``/``bf16`` for the trainer, matching the compute dtype (SFTConfig would otherwise turn bf16 on)."""
    import torch

    dtype = device.compute_dtype()
    return {"fp16": dtype == torch.float16, "bf16": dtype == torch.bfloat16}


def optimizer_for_device(optim: str) -> str:
    """Paged optimizers page their states to CPU memory through CUDA; on a CPU-only machine use torch's fused AdamW
    (one kernel for all the adapter's tensors: measured about 10% faster per step than ``adamw_torch`` on tiny)."""
    import torch

    if optim.startswith("paged_") and not torch.cuda.is_available():
        return "adamw_torch_fused"
    return optim


def checkpointing(enabled: bool) -> dict:
    """Activation (gradient) checkpointing for the trainer's config, as notebook 04 writes it out.

    transformers 5.24 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name works until
    6.0, with a warning). ``use_reentrant=False`` is the implementation that works through frozen 4-bit layers and
    under DDP.
    """
    return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": {"use_reentrant": False}}


def pin_memory() -> bool:
    """Pinned host memory speeds up copies to a GPU; without one there is nothing to pin (and torch warns)."""
    import torch

    return torch.cuda.is_available()


def sft_config(settings, output_dir, evaluation: bool, report_to: str = "none", **overrides):
    """Notebook 04's ``SFTConfig``, argument for argument, for ``train_adapter`` and the benchmark.

    Notebook 04 writes the call out; ``tests/test_training.py`` checks that both set the same arguments.
    ``overrides`` replace or add arguments (the benchmark sets ``max_steps``).
    """
    from trl import SFTConfig

    early_stopping = bool(settings.early_stopping_patience and evaluation)
    kwargs = dict(
        output_dir=str(output_dir),
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a share of all steps (transformers 5)
        optim=optimizer_for_device(settings.optim),
        **checkpointing(settings.gradient_checkpointing),
        train_sampling_strategy="group_by_length",
        dataloader_pin_memory=pin_memory(),
        max_length=settings.max_length,
        packing=settings.packing,
        packing_strategy="bfd",  # whole examples per row, best fit; a longer one is truncated to max_length
        completion_only_loss=settings.completion_only_loss,
        logging_steps=settings.logging_steps,
        logging_first_step=True,  # a run shorter than logging_steps still logs a loss
        logging_nan_inf_filter=False,
        eval_strategy="epoch" if evaluation else "no",
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        report_to=report_to,
        seed=settings.seed,
        use_liger_kernel=False,  # notebook 04's use_liger (liger_route)
        **precision_flags(),
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


class PreparedData(NamedTuple):
    """What notebook 04's data cells make, in the order they make it."""

    train: Dataset  # prompt/completion conversations the adapter trains on
    eval: Dataset | None  # the held-out ones (None without eval_fraction)
    shape: str  # the dataset's shape (data.SHAPES)
    raw: Dataset  # the examples as loaded (cut to max_examples)
    lengths: dict  # data.length_report: tokens per example, truncated and dropped
    split: dict  # {"train": [(question, answer), ...], "eval": [...]}: split.json, which notebook 06 asks


def prepare_datasets(settings, tokenizer) -> PreparedData:
    """Notebook 04's data cells as one call: load, shape-check, write as conversations, check lengths, split.

    ``tokenizer`` must already carry the run's chat template (``models.load_tokenizer(..., chat_format=...)``).
    tests/test_training.py runs the notebook's cells and checks that they give the same datasets and files.
    """
    raw = data.load_examples(settings.dataset)
    shape = data.check_examples(raw, settings.dataset)  # every example, before any model is loaded
    if settings.max_examples:
        raw = raw.shuffle(seed=settings.seed).select(range(min(settings.max_examples, len(raw))))
    to_pc = lambda ex: data.to_prompt_completion(ex, shape, settings.system_prompt)  # noqa: E731
    formatted = raw.map(to_pc, remove_columns=raw.column_names)
    lengths = data.length_report(formatted, tokenizer, settings.max_length)  # fails when every example is too long
    if settings.eval_fraction and len(raw) >= 10:
        split = raw.train_test_split(test_size=settings.eval_fraction, seed=settings.seed)
        raw_train, raw_eval = split["train"], split["test"]
    else:
        raw_train, raw_eval = raw, None
    train = raw_train.map(to_pc, remove_columns=raw.column_names)
    evaluation = raw_eval.map(to_pc, remove_columns=raw.column_names) if raw_eval is not None else None
    pairs = {
        "train": data.question_answer_pairs(raw_train, shape),
        "eval": data.question_answer_pairs(raw_eval, shape) if raw_eval is not None else [],
    }
    return PreparedData(train, evaluation, shape, raw, lengths, pairs)


def training_log(trainer, trainer_route: str, lengths: dict) -> dict:
    """``training_log.json``: what a finished training did (notebook 04 writes it; ``lora-course train`` too).

    Losses first and last, the eval perplexity ``exp(eval loss)``, epochs, whether early stopping ended it, the
    examples' lengths (``data.length_report``), seconds, how many processes trained with which effective batch,
    and every process's adapter checksum (equal under DDP). Every process must call it (it gathers checksums).
    """
    history = trainer.state.log_history
    curves = plots.loss_curves(history)
    final_eval = curves["eval"][-1][1] if curves["eval"] else None
    args = trainer.args
    return {
        "trainer_route": trainer_route,
        "world_size": args.world_size,
        "strategy": "fsdp" if process.fsdp_launched() else ("ddp" if args.world_size > 1 else "single"),
        "effective_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "first_train_loss": curves["train"][0][1],
        "final_train_loss": curves["train"][-1][1],
        "final_eval_loss": final_eval,
        "final_eval_perplexity": math.exp(final_eval) if final_eval is not None else None,
        "epochs_run": trainer.state.epoch,
        "stopped_early": trainer.state.global_step < trainer.state.max_steps,
        "lengths": {name: value for name, value in lengths.items() if name != "lengths"},
        "train_runtime_s": next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None),
        "replica_checksums": process.replica_checksums(trainer.model),  # DDP keeps the copies equal
        "log_history": history,
    }


def adapter_weights_to_float32(model) -> int:
    """Put the trainable (LoRA) weights back in fp32, after ``SFTTrainer`` has cast them to bf16.

    trl casts the adapters of a quantized model to bf16 (the QLoRA paper's choice on A100s). On a T4 that is
    wrong: it has no fast bf16, and fp16 mixed precision needs fp32 master weights (the grad scaler refuses to
    unscale 16-bit gradients). Small Adam updates also vanish in bf16. Adapters are small: fp32 costs little.
    Notebook 04 explains it; returns how many tensors were cast.
    """
    import torch

    cast = 0
    for _, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            cast += 1
    return cast


class StopOnNonFinite(TrainerCallback):
    """Stop training with a clear message when the loss or the gradient norm is NaN or inf.

    Needs ``logging_nan_inf_filter=False`` in the config: by default the trainer logs a NaN step as the average
    of the others, which hides it. Notebook 04 adds this callback to every run.

    In fp16 (a T4) an inf or NaN gradient norm alone is not a failure: the gradient scaler multiplies the loss by
    2**16 to keep small gradients from vanishing, and when that overflows it skips the step and halves the scale.
    This happens in the first steps of many runs (measured on SmolLM2 under the T4 rehearsal: PiSSA and OLoRA at
    step 1, rsLoRA at step 10). It is said once and tolerated; training stops when the loss itself is not finite,
    or when ``fp16_skips`` logged steps in a row had no finite gradient (the scale can no longer help).
    """

    def __init__(self, fp16_skips: int = 8):
        self.fp16_skips = fp16_skips
        self.skipped_in_a_row = 0
        self.said = False

    def _stop(self, args, state, key, value):
        raise FloatingPointError(
            f"Training stopped at step {state.global_step}: {key} is {value}. Usual causes: a learning "
            f"rate too high (now {args.learning_rate:g}: try a tenth), fp16 overflow (on Ampere or newer "
            "use bf16), or examples with no answer tokens. The last checkpoint is in "
            f"{args.output_dir}; nothing after it is kept."
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("loss", "eval_loss"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                self._stop(args, state, key, value)
        norm = logs.get("grad_norm")
        if norm is None:
            return
        if math.isfinite(norm):
            self.skipped_in_a_row = 0
            return
        if not args.fp16:
            self._stop(args, state, "grad_norm", norm)
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.fp16_skips:
            self._stop(args, state, f"grad_norm ({self.skipped_in_a_row} logged steps in a row)", norm)
        if not self.said:
            self.said = True
            print(
                f"step {state.global_step}: fp16 gradients overflowed (grad_norm {norm}); the gradient scaler "
                "skipped that step and lowered its scale. Normal in the first steps on a T4."
            )


@contextlib.contextmanager
def explain_oom(settings):
    """Turn CUDA out-of-memory into a message listing what to lower, with this run's values."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        card = "this GPU"
        if torch.cuda.is_available():
            card = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GB)"
        batch = settings.per_device_train_batch_size
        raise torch.cuda.OutOfMemoryError(
            f"Out of GPU memory on {card}. Lower, in this order:\n"
            f"  per_device_train_batch_size={batch} -> {max(1, batch // 2)}, and double "
            f"gradient_accumulation_steps={settings.gradient_accumulation_steps} to keep the effective batch\n"
            f"  max_length={settings.max_length} -> {settings.max_length // 2}\n"
            f"  gradient_checkpointing={settings.gradient_checkpointing} -> True\n"
            f"  lora_r={settings.lora_r} -> {max(1, settings.lora_r // 2)}, or target_modules="
            f"{settings.target_modules!r} -> 'q_proj,v_proj'\n"
            "Then restart the runtime: memory stays fragmented after an out-of-memory error."
        ) from error


def check_every_batch_supervised(trainer) -> dict:
    """Go through the training batches once and fail if any has no token that counts in the loss."""
    counts = []
    for batch in trainer.get_train_dataloader():
        counts.append(int((batch["labels"] != -100).sum()))
    if not counts or min(counts) == 0:
        raise ValueError(
            f"{counts.count(0)} of {len(counts)} training batches have no token in the loss: their answers were "
            "cut off by max_length or are empty. Raise max_length, or check the completion column."
        )
    return {"batches": len(counts), "fewest_supervised_tokens": min(counts), "supervised_tokens": sum(counts)}


def remove_incomplete_checkpoints(checkpoint_dir) -> list[str]:
    """Remove checkpoints whose save was cut off (a session killed while saving): the trainer writes
    ``trainer_state.json`` last, so a checkpoint without it is incomplete and cannot be resumed from."""
    import shutil

    removed = []
    for checkpoint in sorted(Path(checkpoint_dir).glob("checkpoint-*")):
        if checkpoint.is_dir() and not (checkpoint / "trainer_state.json").exists():
            shutil.rmtree(checkpoint)
            removed.append(checkpoint.name)
            print(f"removed {checkpoint.name}: its save was interrupted, so it is incomplete")
    return removed


def last_complete_checkpoint(checkpoint_dir) -> str | None:
    """The checkpoint of the highest step that holds ``trainer_state.json`` (written last), if any."""
    complete = [p.parent for p in Path(checkpoint_dir).glob("checkpoint-*/trainer_state.json")]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


# Settings a resumed run may change: how long it goes on, how often it logs, what it generates afterwards.
RESUMABLE_CHANGES = ("num_train_epochs", "logging_steps", "early_stopping_patience", "max_new_tokens", "processes")


def check_resume_settings(checkpoint_dir, run_config: dict) -> None:
    """Refuse to resume checkpoints made with other settings: the adapter would be two trainings in one, while
    ``run_config.json`` and ``split.json`` describe only the second (another rank fails with a long size mismatch).
    The checkpoints' settings are the ``run_config.json`` written beside them when the run started."""
    started = files.read_json(Path(checkpoint_dir) / "run_config.json", missing=None)
    if started is None or last_complete_checkpoint(checkpoint_dir) is None:
        return
    changed = [
        f"{name}={run_config.get(name)!r} (started with {started.get(name)!r})"
        for name in sorted(set(started) | set(run_config))
        if name not in RESUMABLE_CHANGES and started.get(name) != run_config.get(name)
    ]
    if changed:
        raise ValueError(
            f"resume=True, but the checkpoints in {checkpoint_dir} were made with other settings: {'; '.join(changed)}. "
            "Either continue with the settings the run started with (drop those -p values), or start again "
            "without resume, with overwrite=True."
        )


def prepare_checkpoints(checkpoint_dir, resume: bool, overwrite: bool, run_config: dict | None = None):
    """What to pass as ``resume_from_checkpoint``; refuse to mix a new run with an interrupted one's checkpoints.

    With ``run_config`` (the run's settings), a new run writes them beside its checkpoints and a resumed one must
    have the same (``check_resume_settings``).
    """
    checkpoint_dir = Path(checkpoint_dir)
    remove_incomplete_checkpoints(checkpoint_dir)
    last = last_complete_checkpoint(checkpoint_dir)
    if resume and last is not None:
        if run_config is not None:
            check_resume_settings(checkpoint_dir, run_config)
        return last
    if resume:
        print(f"resume=True, but there is no checkpoint in {checkpoint_dir}: starting from the beginning.")
    elif last is not None:
        if not overwrite:
            raise FileExistsError(
                f"{checkpoint_dir} holds checkpoints of an interrupted run ({Path(last).name}). Pass resume=True "
                "to continue it, or overwrite=True to start again from the beginning."
            )
        import shutil

        shutil.rmtree(checkpoint_dir)
    if run_config is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(checkpoint_dir / "run_config.json", run_config)  # what a resumed run must match
    return None


def embeddings_in_compute_dtype(model) -> int:
    """Undo ``prepare_model_for_kbit_training``'s fp32 upcast for the frozen embedding and output head.

    peft casts every weight that is not quantized to fp32, for the norms' sake. The embedding and the output head
    are frozen and are only ever used in the compute dtype (autocast makes an fp16 copy of the head at every
    step): with Llama-3.1-8B's 128k-token vocabulary they take 4.2 GB in fp32, 2.1 GB in fp16 (measured on a GPU:
    the weights as training holds them, 7.3 -> 5.3 GB).
    Returns the number of parameters cast back. Notebook 04 calls it after ``prepare_model_for_kbit_training``.
    """
    dtype = device.compute_dtype()
    cast = 0
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dtype != dtype and not weight.requires_grad:
            module.to(dtype)
            cast += weight.numel()
    head = model.get_output_embeddings()
    if cast and head is not None:  # the fp32 final norm feeds it: match its dtype outside autocast too
        head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))
    return cast


def unsloth_route(requested: bool) -> tuple[bool, str]:
    """Whether notebook 04 takes the Unsloth route, and why (or why not), in words for the learner.

    Unsloth (two of the source documents' fast route) needs a CUDA GPU and the ``unsloth`` package, an optional
    install (README, "Unsloth"). Anywhere else the standard route runs with the same settings.
    """
    import importlib.util

    import torch

    if not requested:
        return False, "route: transformers + peft (use_unsloth=True for Unsloth's kernels on a CUDA GPU)"
    if not torch.cuda.is_available():
        return False, "use_unsloth=True, but Unsloth needs a CUDA GPU and there is none here: the standard route runs"
    if importlib.util.find_spec("unsloth") is None:
        return False, (
            "use_unsloth=True, but Unsloth is not installed (README, 'Unsloth': pip install unsloth, in its own "
            "environment): the standard route runs"
        )
    return True, "route: Unsloth (FastLanguageModel), with the same LoRA and training settings"


def liger_route(requested: bool) -> tuple[bool, str]:
    """Whether notebook 04 trains with Liger's kernels (``use_liger_kernel``), and why (or why not), in words.

    Liger replaces RMSNorm, RoPE and SwiGLU with Triton kernels: fewer, larger GPU kernels per step (measured with
    Llama-3.1-8B's shapes on an H200: 12,161 -> 7,714 kernels per step, 1.17x the real tokens/s at batch 1; loss
    within 1e-3 and LoRA gradients within 1.5% in fp16; README, "Performance"). It needs a CUDA GPU and the
    ``liger-kernel`` package (the ``liger`` extra). Triton officially supports compute capability 8.0 and newer; a
    T4 is 7.5.
    """
    import importlib.util

    import torch

    if not requested:
        return False, "kernels: PyTorch's (use_liger=True for Liger's Triton kernels on a CUDA GPU)"
    if not torch.cuda.is_available():
        return False, "use_liger=True, but Liger's kernels need a CUDA GPU and there is none here: PyTorch's run"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, (
            "use_liger=True, but liger-kernel is not installed (pip install liger-kernel, or the course's [liger] "
            "extra): PyTorch's kernels run"
        )
    major, minor = torch.cuda.get_device_capability()
    caveat = (
        f" (compute capability {major}.{minor}: below Triton's official 8.0, as on a T4; if training fails or its "
        "loss differs from a run with use_liger=False, turn it off)"
        if major < 8
        else ""
    )
    return True, "kernels: Liger's RMSNorm, RoPE and SwiGLU (use_liger_kernel=True)" + caveat


def lora_model(
    settings,
    adapter_name: str = "default",
    attn_implementation: str | None = "auto",
    tokenizer=None,
    quant_storage=None,
):
    """Notebook 04's model: the base (in NF4 when ``load_in_4bit``), prepared for k-bit training, with adapters.

    Used by ``train_adapter``, the benchmark and ``sharding``; ``attn_implementation``, ``tokenizer`` and
    ``quant_storage`` as in ``base_for_training``.
    """
    from peft import get_peft_model

    model = base_for_training(settings, attn_implementation, tokenizer, quant_storage)
    return get_peft_model(model, lora_config(settings, model), adapter_name=adapter_name)


def base_for_training(settings, attn_implementation: str | None = "auto", tokenizer=None, quant_storage=None):
    """Notebook 04's base model before its adapters: loaded (in NF4 when ``load_in_4bit``), prepared for k-bit
    training. ``sweep`` loads it once and gives each variant fresh adapters.

    ``attn_implementation`` and ``quant_storage`` as in ``models.load_model``. With a ``tokenizer`` that had to add
    a pad token, the embeddings grow to fit it (``models.match_vocabulary``). For FSDP (a float ``quant_storage``,
    or ``accelerate launch`` with an FSDP configuration) every weight stays in the storage dtype, as trl does for
    sharded QLoRA: FSDP gathers a block's weights in one dtype, and ``prepare_model_for_kbit_training`` would
    upcast some of them to fp32.
    """
    from peft import prepare_model_for_kbit_training

    from lora_helpers import models

    model = models.load_model(
        settings.model_id,
        settings.load_in_4bit,
        trust_remote_code=settings.trust_remote_code,
        attn_implementation=attn_implementation,
        quant_storage=quant_storage,
    )
    if tokenizer is not None:
        models.match_vocabulary(model, tokenizer)
    sharded = quant_storage is not None or process.fsdp_launched()
    if settings.load_in_4bit and not sharded:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
        embeddings_in_compute_dtype(model)
    elif settings.load_in_4bit and settings.gradient_checkpointing:  # trl's choice for sharded QLoRA too: no fp32
        model.enable_input_require_grads()  # upcast, which would break FSDP's one dtype per block
    return model


@contextlib.contextmanager
def fresh_adapters(base, config, seed: int = 0, restore_base: bool = False):
    """Fresh LoRA adapters (``get_peft_model``, seeded) on an already loaded base, for one run; afterwards they
    are taken off (``unload``) and the base is as it was.

    Notebook 08's grid and the benchmark (``sweep``) train many adapters on one base, since a load costs more
    than a short run. trl wraps the instance's ``forward`` (its fused LM head): it is put back. PiSSA and OLoRA
    rewrite the base weights (the base minus what the adapter starts with): ``restore_base`` copies them first.
    """
    import gc

    import torch
    from peft import get_peft_model
    from transformers import set_seed

    saved = {key: value.detach().clone() for key, value in base.state_dict().items()} if restore_base else None
    patched_forward = base.__dict__.get("forward")
    set_seed(seed)
    net = get_peft_model(base, config)
    try:
        yield net
    finally:
        net.unload()
        del net
        if patched_forward is None:
            base.__dict__.pop("forward", None)
        else:
            base.forward = patched_forward
        if saved is not None:
            base.load_state_dict(saved)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def lora_config(settings, model):
    """Notebook 04's ``LoraConfig`` for this model (``target_modules`` resolved against its layers)."""
    from peft import LoraConfig

    from lora_helpers import lora

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=lora.resolve_target_modules(model, settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_adapter(
    settings,
    output_dir: str,
    adapter_name: str = "default",
    resume: bool = False,
    overwrite: bool = False,
    callbacks=(),
    checkpoint_dir: str | None = None,
    extra_args: dict | None = None,
    saved_with: dict | None = None,
    progress=None,
):
    """Train one LoRA adapter with the notebook-04 recipe and save it to ``output_dir``. Returns the trainer.

    Checkpoints go to ``checkpoint_dir`` (default ``OUTPUT_DIR-checkpoints``) after every epoch; ``resume=True``
    continues from the last one. ``extra_args`` go to ``SFTConfig`` (``launch.ddp_arguments`` for several
    processes). Under several processes only the main one saves; ``saved_with`` is written beside the adapter as
    ``run_config.json`` (notebook 04 does the same). ``progress``: a callback that replaces the trainer's progress
    bar (``progress_lines()``; on a page the course runner executes, that is the default). Under ``accelerate launch`` with FSDP the adapters keep the storage dtype
    (``lora_model``) and every process takes part in saving.
    """
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTTrainer

    from lora_helpers import models

    checkpoint_dir = checkpoint_dir or f"{output_dir}-checkpoints"
    if process.world()[0] == 0:
        run_config = saved_with if saved_with is not None else dataclasses.asdict(settings)
        resume_from = prepare_checkpoints(checkpoint_dir, resume, overwrite, run_config)
    else:  # the main process alone removes or refuses; the others only find the checkpoint to resume from
        resume_from = last_complete_checkpoint(checkpoint_dir) if resume else None
    set_seed(settings.seed)
    tokenizer = models.load_tokenizer(settings.model_id, settings.trust_remote_code, settings.chat_format)
    model = lora_model(settings, adapter_name, tokenizer=tokenizer)
    sharded = process.fsdp_launched()  # accelerate launch with an FSDP configuration (notebook 07)
    prepared = prepare_datasets(settings, tokenizer)
    train, evaluation = prepared.train, prepared.eval
    replayed = retention.replay_examples(model, tokenizer, settings)  # the base's own answers (notebook 04)
    distilling = bool(replayed) and settings.replay_loss == "distill"  # a KL term per step, not mixed-in targets
    if distilling and sharded:
        raise ValueError(
            "replay_loss='distill' is not run under FSDP here (its base forward pass needs the whole adapter "
            "switched off on every shard): use DDP (notebook 07's default) or replay_loss='answers'."
        )
    trained_on = (
        concatenate_datasets([train, Dataset.from_list(replayed)]).shuffle(seed=settings.seed)
        if replayed and not distilling
        else train
    )
    early_stopping = bool(settings.early_stopping_patience and evaluation is not None)
    args = sft_config(settings, checkpoint_dir, evaluation is not None, **(extra_args or {}))
    callbacks = [StopOnNonFinite(), *callbacks]
    if early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    if distilling:
        from lora_helpers import distill

        trainer_class = distill.ReplayDistillationTrainer
        replay_args = {"replay_examples": replayed, "replay_weight": settings.replay_weight}
    else:
        trainer_class, replay_args = SFTTrainer, {}
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=trained_on,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        callbacks=callbacks,
        **replay_args,
    )
    trainer.prepared = prepared  # the data before the trainer's tokenization, without replay: split.json, lengths
    if progress is None and process.on_executed_page():
        progress = progress_lines()
    if progress is not None:
        use_progress_lines(trainer, progress)
    if not sharded:
        adapter_weights_to_float32(trainer.model)
    with explain_oom(settings):
        trainer.train(resume_from_checkpoint=resume_from)
    # Under FSDP each process holds a shard of every weight: all of them take part in gathering the whole adapter.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if trainer.is_world_process_zero():
        with files.atomic_dir(output_dir) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            if saved_with is not None:
                files.write_json(Path(tmp) / "run_config.json", saved_with)
    return trainer


def progress_lines(lines: int = 10) -> TrainerCallback:
    """A trainer callback printing about ``lines`` lines over a whole training, on the main process only.

    Each line: step, epoch, and the latest train and eval loss; the last one when training ends. Several processes
    drawing progress bars on one terminal interleave into noise (``lora-course train``), and a saved page keeps
    every frame of a live table (notebooks 04 and 06 under the course runner).
    """

    class ProgressLines(TrainerCallback):
        def __init__(self):
            self.latest, self.next_step = {}, 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.latest |= {name: logs[name] for name in ("loss", "eval_loss") if name in (logs or {})}
            if self.latest and state.global_step >= self.next_step and state.global_step < state.max_steps:
                self.next_step = state.global_step + max(1, state.max_steps // lines)
                self.show(state)

        def on_train_end(self, args, state, control, **kwargs):
            if self.latest:
                self.show(state)

        def show(self, state):
            if state.is_world_process_zero:
                losses = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in self.latest.items())
                print(f"step {state.global_step}/{state.max_steps}, epoch {state.epoch:.2f}: {losses}", flush=True)

    return ProgressLines()


def use_progress_lines(trainer, callback: TrainerCallback | None = None) -> None:
    """Replace the trainer's progress bar or live table (it picks one of three) with ``progress_lines()``."""
    from transformers import PrinterCallback, ProgressCallback

    bars = [PrinterCallback, ProgressCallback]
    try:  # the live table exists only where IPython is installed (a notebook, not a plain script)
        from transformers.utils.notebook import NotebookProgressCallback

        bars.append(NotebookProgressCallback)
    except ImportError:
        pass
    for bar in bars:
        trainer.remove_callback(bar)
    trainer.add_callback(callback or progress_lines())
