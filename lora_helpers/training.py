"""The training recipe of notebook 04, for reuse once it has been taught.

Notebook 04 writes every call out (``LoraConfig``, ``SFTConfig``, ``SFTTrainer``);
notebook 06 and the tests call ``train_adapter`` here to train a second adapter
the same way, as d2l does with functions taught in earlier chapters.
"""

from __future__ import annotations

from lora_helpers import data, device, files


def precision_flags() -> dict:
    """``fp16``/``bf16`` for the trainer, matching the compute dtype (SFTConfig would otherwise turn bf16 on)."""
    import torch

    dtype = device.compute_dtype()
    return {"fp16": dtype == torch.float16, "bf16": dtype == torch.bfloat16}


def optimizer_for_device(optim: str) -> str:
    """Paged optimizers page their states to CPU memory through CUDA; on a CPU-only machine use plain AdamW."""
    import torch

    if optim.startswith("paged_") and not torch.cuda.is_available():
        return "adamw_torch"
    return optim


def prepare_datasets(settings, tokenizer):
    """Load, shape-check, format as prompt/completion, and split. Returns (train, eval or None, shape, raw)."""
    raw = data.load_examples(settings.dataset)
    if settings.max_examples:
        raw = raw.shuffle(seed=settings.seed).select(range(min(settings.max_examples, len(raw))))
    shape = data.detect_shape(raw.column_names)
    formatted = raw.map(
        lambda ex: data.to_prompt_completion(ex, shape, tokenizer, settings.chat_format, settings.system_prompt),
        remove_columns=raw.column_names,
    )
    data.check_lengths(data.token_lengths(formatted, tokenizer), settings.max_length)
    if settings.eval_fraction and len(formatted) >= 10:
        split = formatted.train_test_split(test_size=settings.eval_fraction, seed=settings.seed)
        return split["train"], split["test"], shape, raw
    return formatted, None, shape, raw


def train_adapter(settings, output_dir: str, adapter_name: str = "default"):
    """Train one LoRA adapter with the notebook-04 recipe and save it to ``output_dir``. Returns the trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from lora_helpers import lora, models

    device.seed_everything(settings.seed)
    tokenizer = models.load_tokenizer(settings.model_id, settings.trust_remote_code)
    model = models.load_model(settings.model_id, settings.load_in_4bit, trust_remote_code=settings.trust_remote_code)
    if settings.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=lora.resolve_target_modules(model, settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config, adapter_name=adapter_name)
    train, evaluation, _, _ = prepare_datasets(settings, tokenizer)
    args = SFTConfig(
        output_dir=f"{output_dir}-checkpoints",
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a share of all steps (transformers 5)
        optim=optimizer_for_device(settings.optim),
        gradient_checkpointing=settings.gradient_checkpointing,
        max_length=settings.max_length,
        logging_steps=settings.logging_steps,
        eval_strategy="epoch" if evaluation is not None else "no",
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        **precision_flags(),
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer
    )
    trainer.train()
    with files.atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return trainer
