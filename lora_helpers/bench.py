"""A training benchmark: the course's recipe against seed 000's plain recipe, run side by side, as ratios.

``python -m lora_helpers bench [--model tiny|mid] [--steps N]`` writes ``bench.json`` and ``bench.md``.
Both variants train the same 4-bit model with the same LoRA settings on the same
data for the same number of optimizer steps, each in a fresh process (so that
peak memory is its own):

- baseline (seed 000): ``Trainer`` + ``DataCollatorForLanguageModeling``, every example padded to
  ``max_length``, loss on every token, random batches;
- course: ``SFTTrainer``, each batch padded only to its longest example, batches grouped by length,
  loss on the answers.

Reported: optimizer steps per second, real (non-pad) tokens per second, supervised tokens per second, and peak
memory (CUDA max allocated on a GPU, peak RSS on a CPU). Timings are ratios measured in one run on one machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from lora_helpers import files, presets

MID_CONFIG = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
)


def mid_model_dir() -> Path:
    """A mid-size Llama (about 15M parameters, random weights) with the tiny tokenizer, built once and cached."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_helpers import tiny

    target = tiny.cache_root() / "mid-llama-v1"
    if (target / "config.json").exists():
        return target
    tokenizer = tiny.build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **MID_CONFIG,
    )
    torch.manual_seed(0)
    with files.atomic_dir(target) as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _peak_memory_bytes() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def run_variant(variant: str, model: str, steps: int, batch_size: int, max_length: int) -> dict:
    """Train ``steps`` optimizer steps with one recipe; return its measurements."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from lora_helpers import device, lora, models, training

    model_id = str(mid_model_dir()) if model == "mid" else "tiny"
    settings = presets.resolve_settings(
        "tiny", model_id=model_id, per_device_train_batch_size=batch_size, max_length=max_length, eval_fraction=0.0
    )
    device.seed_everything(0)
    tokenizer = models.load_tokenizer(model_id)
    base = prepare_model_for_kbit_training(
        models.load_model(model_id, load_in_4bit=True), use_gradient_checkpointing=False
    )
    targets = lora.resolve_target_modules(base, "all-linear")
    net = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    train, _, _, _ = training.prepare_datasets(settings, tokenizer)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="lora-bench-"),  # save_strategy="no": nothing is kept there
        max_steps=steps,
        learning_rate=2e-4,
        per_device_train_batch_size=batch_size,
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_drop_last=True,
        **training.precision_flags(),
    )
    if variant == "baseline":
        tokenized = train.map(
            lambda ex: tokenizer(
                ex["prompt"] + ex["completion"], padding="max_length", truncation=True, max_length=max_length
            ),
            remove_columns=train.column_names,
        )
        trainer = Trainer(
            model=net,
            args=TrainingArguments(**common),
            train_dataset=tokenized,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
    else:
        trainer = SFTTrainer(
            model=net,
            args=SFTConfig(**common, max_length=max_length, train_sampling_strategy="group_by_length"),
            train_dataset=train,
            processing_class=tokenizer,
        )
        training.adapter_weights_to_float32(trainer.model)
    counts = {"real": 0, "supervised": 0, "padded": 0}
    loader = trainer.get_train_dataloader()
    for index, batch in enumerate(loader):  # what the trainer will see, counted once, outside the timing
        if index >= steps:
            break
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["input_ids"].numel()
        counts["supervised"] += int((batch["labels"] != -100).sum())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "model": model,
        "steps": steps,
        "seconds": seconds,
        "real_tokens": counts["real"],
        "supervised_tokens": counts["supervised"],
        "all_tokens": counts["padded"],
        "seconds_per_step": seconds / steps,
        "real_tokens_per_s": counts["real"] / seconds,
        "supervised_tokens_per_s": counts["supervised"] / seconds,
        "all_tokens_per_s": counts["padded"] / seconds,
        "peak_memory_mb": _peak_memory_bytes() / 2**20,
        "device": device.environment_report()["device"],
    }


def _child(queue, *args):
    queue.put(run_variant(*args))


def benchmark(model: str = "tiny", steps: int = 20, batch_size: int = 8, max_length: int = 128) -> dict:
    """Run baseline and course recipes, each in a fresh process, and report course/baseline ratios."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = {}
    for variant in ("baseline", "course"):
        queue = context.Queue()
        process = context.Process(target=_child, args=(queue, variant, model, steps, batch_size, max_length))
        process.start()
        results[variant] = queue.get()
        process.join()
    base, ours = results["baseline"], results["course"]
    ratios = {
        "real_tokens_per_s": ours["real_tokens_per_s"] / base["real_tokens_per_s"],
        "supervised_tokens_per_s": ours["supervised_tokens_per_s"] / base["supervised_tokens_per_s"],
        "steps_per_s": base["seconds_per_step"] / ours["seconds_per_step"],
        "peak_memory": ours["peak_memory_mb"] / base["peak_memory_mb"],
    }
    return {
        "settings": {"model": model, "steps": steps, "batch_size": batch_size, "max_length": max_length},
        "baseline": base,
        "course": ours,
        "ratio_course_over_baseline": ratios,
    }


def markdown_table(result: dict) -> str:
    b, c, r = result["baseline"], result["course"], result["ratio_course_over_baseline"]
    rows = [
        ("optimizer steps / s", 1 / b["seconds_per_step"], 1 / c["seconds_per_step"], r["steps_per_s"]),
        ("real tokens / s", b["real_tokens_per_s"], c["real_tokens_per_s"], r["real_tokens_per_s"]),
        (
            "supervised tokens / s",
            b["supervised_tokens_per_s"],
            c["supervised_tokens_per_s"],
            r["supervised_tokens_per_s"],
        ),
        ("peak memory (MB)", b["peak_memory_mb"], c["peak_memory_mb"], r["peak_memory"]),
    ]
    s = result["settings"]
    lines = [
        f"Model `{s['model']}`, {s['steps']} steps, batch {s['batch_size']}, max_length {s['max_length']}, "
        f"on {c['device']}.",
        "",
        "| | baseline (seed 000) | course | course / baseline |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {x:,.1f} | {y:,.1f} | {ratio:.2f}x |" for name, x, y, ratio in rows]
    return "\n".join(lines)


def write_results(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(out_dir / "bench.json", result)
    (out_dir / "bench.md").write_text(markdown_table(result) + "\n")
    return out_dir / "bench.json", out_dir / "bench.md"


def as_json(result: dict) -> str:
    return json.dumps(result, indent=2)
