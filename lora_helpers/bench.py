"""A training benchmark: the course's recipe against the Llama-2 about-me recipe, run side by side, as ratios.

``python -m lora_helpers bench [--model tiny|mid|llama-2-7b|llama-3.2-3b|llama-3.1-8b] [--preset NAME]``
writes ``bench.json`` and ``bench.md``. Every variant trains the same 4-bit model with the same LoRA settings,
gradient checkpointing and batch size for the same number of optimizer steps, each in a fresh process (so that
its peak memory is its own):

- baseline (the Llama-2 about-me recipe): ``Trainer`` + ``DataCollatorForLanguageModeling``, every example padded to
  ``max_length``, transformers' default attention, random batches, loss on every token;
- course: notebook 04's recipe (``training.sft_config``): ``SFTTrainer``, each batch padded only to its longest
  example, batches grouped by length, the device's attention and optimizer, loss on the answers;
- course + packing: the course's recipe with ``packing=True`` (notebook 04, "Packing"): each row of the batch
  holds several whole examples, each attending only to itself; the same number of optimizer steps carries more
  real tokens;
- course at max_length: the course's recipe on examples that all fill ``max_length`` (the worst case, which
  the memory planner estimates), to compare the planner's estimate with a measured peak.

Models: ``tiny`` (the course's), ``mid`` (a 15M-parameter Llama), and, for a GPU, random-weight models with the
exact shapes of Llama-2-7B, Llama-3.2-3B and Llama-3.1-8B, written from the shipped ``config.json`` files (no
download), loaded through the same 4-bit ``from_pretrained`` path as the notebooks.

Reported: optimizer steps per second, tokens per second (real, supervised, and all including padding), counted
from what the model is really given, over the steps after ``WARMUP_STEPS``; peak memory (CUDA max reserved and
max allocated on a GPU, peak RSS on a CPU). Timings are ratios measured in one run on one machine.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import tempfile
import time
from pathlib import Path

from lora_helpers import files, plan, presets

# Random-weight models with real shapes (GPU only), and the preset each is measured with by default:
SHAPED = {"llama-2-7b": "llama2-7b-about-me", "llama-3.2-3b": "llama3.2-3b", "llama-3.1-8b": "llama3.1-8b"}
REAL = {"smollm2-135m": "smollm2-135m"}  # a real pretrained model, offline (lora_helpers.smollm2), and its preset
MODELS = ("tiny", "mid", *REAL, *SHAPED)
VARIANTS = ("baseline", "course", "course + packing", "course at max_length")
INTERLEAVED = VARIANTS[:3]  # repeated in turn; the worst case runs once
OFFLINE_DATASET = "package:guanaco_llama2_sample.jsonl"  # for presets whose dataset is on the Hub
WARMUP_STEPS = 3  # not timed: the first steps allocate, warm caches and build kernels
GB = 2**30


def model_dir(model: str) -> str:
    """The model to benchmark: ``tiny`` as it is, the others random-weight models built once (``tiny.py``)."""
    from lora_helpers import tiny

    if model == "tiny":
        return "tiny"
    if model in REAL:
        return presets.get_preset(REAL[model]).model_id
    if model not in MODELS:
        raise ValueError(f"Unknown benchmark model {model!r}. Choose one of: {', '.join(MODELS)}.")
    if model in SHAPED:  # the same models as the course runner's --random-weights
        return str(tiny.real_size_model_dir(model))
    return str(tiny.random_model_dir(model))


def full_length_dataset(tokenizer, n: int, max_length: int):
    """``n`` pre-tokenized examples of exactly ``max_length`` tokens, the second half the answer: the worst case."""
    from datasets import Dataset

    from lora_helpers import data

    answers = [ex["messages"][-1]["content"] for ex in data.load_examples("package:about_me.jsonl")]
    ids = [i for answer in answers for i in tokenizer(answer, add_special_tokens=False)["input_ids"]]
    ids = (ids * (max_length // len(ids) + 2))[: max_length - 1]
    row = [tokenizer.bos_token_id, *ids]
    mask = [0] * (max_length // 2) + [1] * (max_length - max_length // 2)
    return Dataset.from_dict({"input_ids": [row] * n, "completion_mask": [mask] * n})


def saved_for_backward_bytes(model, input_ids) -> int:
    """Bytes one forward pass keeps for the backward pass (activations and logits; weights excluded).

    Counted with autograd's saved-tensor hooks, with gradient checkpointing off for the pass: this is what the
    planner's "activations" (without checkpointing) and half its "logits" (the other half is their gradient)
    estimate. Device-independent, so the planner's activation model is checked on a CPU too.
    """
    import torch

    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in owned:
            kept[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    checkpointing = inner.is_activation_checkpointing
    if checkpointing:
        inner.activation_checkpointing_disable()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=input_ids, labels=input_ids)
    finally:
        if checkpointing:
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return sum(kept.values())


def batch_tokens(kwargs: dict) -> dict:
    """The tokens of one batch as the model is given it (a forward pre-hook's ``kwargs``): all, real (not padding)
    and supervised (a label other than -100)."""
    ids, mask, labels = kwargs["input_ids"], kwargs.get("attention_mask"), kwargs.get("labels")
    return {
        "all": ids.numel(),
        "real": int(mask.sum()) if mask is not None else ids.numel(),
        "supervised": int((labels != -100).sum()) if labels is not None else 0,
    }


class _Meter:
    """Counts the tokens of every batch the model is given and times the steps after the warm-up.

    On a GPU the time is the wall clock's. On a CPU it is the CPU time of this process (all its threads): on a
    shared machine other processes stretch the wall clock of whichever variant runs at a busy moment, but not the
    work each variant's own threads do. (``benchmark`` also makes idle OpenMP threads sleep instead of spinning,
    so that waiting is not counted as work.)
    """

    def __init__(self, warmup: int):
        import torch
        from transformers import TrainerCallback

        self.clock = time.perf_counter if torch.cuda.is_available() else time.process_time
        self.warmup, self.batches, self.first = warmup, [], None
        self.start = self.wall_start = self.seconds = self.wall_seconds = None
        meter = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == meter.warmup:
                    meter.start, meter.wall_start = meter.clock(), time.perf_counter()
                    meter.first = len(meter.batches)

            def on_train_end(self, args, state, control, **kwargs):
                meter.seconds = meter.clock() - meter.start
                meter.wall_seconds = time.perf_counter() - meter.wall_start

        self.callback = Callback()

    def hook(self, module, args, kwargs):
        self.batches.append(batch_tokens(kwargs))

    def totals(self) -> dict:
        timed = self.batches[self.first :]
        return {key: sum(b[key] for b in timed) for key in ("all", "real", "supervised")}


def _peak_memory() -> dict:
    import resource

    import torch

    if torch.cuda.is_available():
        return {
            "peak_memory_mb": torch.cuda.max_memory_reserved() / 2**20,
            "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
        }
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # kB on Linux


def baseline_trainer(net, tokenizer, settings, train, output_dir, quiet: dict, callback):
    """The Llama-2 about-me recipe's training: plain ``Trainer``, every example padded to ``max_length``, the
    collator's labels (the loss on every token), with the course's ids, optimizer and checkpointing."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from lora_helpers import chat, training

    def ids(ex):  # the same ids as the course's (or rows already tokenized, as the full-length ones)
        ids = ex["input_ids"] if "input_ids" in ex else chat.template_ids(tokenizer, ex["prompt"] + ex["completion"])
        return ids[: settings.max_length]

    tokenized = train.map(  # every example padded to max_length
        lambda ex: tokenizer.pad({"input_ids": ids(ex)}, padding="max_length", max_length=settings.max_length),
        remove_columns=train.column_names,
    )
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        learning_rate=settings.learning_rate,
        **training.checkpointing(settings.gradient_checkpointing),  # the same in every variant
        dataloader_pin_memory=training.pin_memory(),
        optim=training.optimizer_for_device(settings.optim),
        report_to="none",
        seed=0,
        **training.precision_flags(),
        **quiet,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=net, args=args, train_dataset=tokenized, data_collator=collator, callbacks=[callback])


def planner_against_run(net, settings, train, compute_bytes: int) -> dict:
    """The planner's weights, peak and activations beside the activations this model saves for one example."""
    import torch

    net.train()
    example = torch.tensor(train[:1]["input_ids"], device=net.device)
    one = plan.plan(
        dataclasses.replace(settings, per_device_train_batch_size=1, gradient_checkpointing=False),
        compute_bytes,
        gpu=torch.cuda.is_available(),
    )
    planned = plan.plan(settings, compute_bytes, gpu=torch.cuda.is_available())
    parts = planned["parts_gb"]
    return {
        "planned_weights_mb": (parts["quantized weights"] + parts["unquantized parts"]) * 1024,
        "planned_peak_mb": planned["peak_gb"] * 1024,
        "activations_mb": saved_for_backward_bytes(net, example) / 2**20,
        "planned_activations_mb": (one["activations_gb"]["without"] + one["parts_gb"]["logits"] / 2) * 1024,
    }


def run_variant(
    variant: str,
    model: str,
    preset: str,
    steps: int,
    batch_size: int | None,
    max_length: int | None,
    dataset: str | None = None,
):
    """Train ``steps`` optimizer steps (after ``WARMUP_STEPS`` untimed ones) with one recipe; return measurements."""
    import torch
    from datasets import concatenate_datasets
    from transformers import set_seed
    from trl import SFTTrainer

    from lora_helpers import device, models, training

    overrides = {"per_device_train_batch_size": batch_size, "max_length": max_length, "dataset": dataset}
    if not (dataset or presets.get_preset(preset).dataset).startswith("package:"):  # no download: shipped examples
        overrides["dataset"] = OFFLINE_DATASET
    settings = presets.resolve_settings(
        preset, model_id=model_dir(model), gradient_accumulation_steps=1, eval_fraction=0.0, **overrides
    )
    set_seed(0)
    tokenizer = models.load_tokenizer(settings.model_id, chat_format=settings.chat_format)
    net = training.lora_model(settings, attn_implementation=None if variant == "baseline" else "auto")
    adapters = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    weights_mb = (net.get_memory_footprint() - adapters) / 2**20  # as training holds them: the rest in fp32
    compute_bytes = torch.finfo(device.compute_dtype()).bits // 8
    prepared = training.prepare_datasets(settings, tokenizer)
    meter = _Meter(WARMUP_STEPS)
    total_steps = steps + WARMUP_STEPS
    # Enough examples for every step within one epoch, packed too (a packed row holds max_length tokens): a small
    # data set is repeated, the same for every variant.
    tokens = sum(min(n, settings.max_length) for n in prepared.lengths["lengths"])
    copies = math.ceil((total_steps + 1) * settings.per_device_train_batch_size * settings.max_length / tokens)
    train = concatenate_datasets([prepared.train] * copies) if copies > 1 else prepared.train
    scratch = tempfile.mkdtemp(prefix="lora-bench-")  # save_strategy="no": nothing is kept there
    quiet = dict(
        max_steps=total_steps,
        logging_steps=total_steps,
        logging_first_step=False,
        save_strategy="no",
        dataloader_drop_last=True,
    )
    if variant == "baseline":
        trainer = baseline_trainer(net, tokenizer, settings, train, scratch, quiet, meter.callback)
    else:
        if variant == "course at max_length":
            train = full_length_dataset(tokenizer, 4 * settings.per_device_train_batch_size, settings.max_length)
        packing = {"packing": True} if variant == "course + packing" else {}
        args = training.sft_config(settings, scratch, evaluation=False, **quiet, **packing)
        trainer = SFTTrainer(
            model=net, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[meter.callback]
        )
        training.adapter_weights_to_float32(trainer.model)
    # the planner against this run, with activations measured for one example
    planner = planner_against_run(net, settings, train, compute_bytes) if variant == "course at max_length" else {}
    net.register_forward_pre_hook(meter.hook, with_kwargs=True)
    if torch.cuda.is_available():
        # The planner's measuring pass above leaves its graph to the garbage collector (6.5 GB for the 8B shape at
        # 512 tokens, counted in the first GPU measurement's peak): collect it, then count from here.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens, seconds = meter.totals(), meter.seconds
    return {
        "variant": variant,
        "model": model,
        "preset": preset,
        "steps": steps,
        "dataset": settings.dataset,
        "batch_size": settings.per_device_train_batch_size,
        "max_length": settings.max_length,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "seconds": seconds,
        "wall_seconds": meter.wall_seconds,
        "clock": "wall" if torch.cuda.is_available() else "CPU time of the process",
        "real_tokens": tokens["real"],
        "supervised_tokens": tokens["supervised"],
        "all_tokens": tokens["all"],
        "seconds_per_step": seconds / steps,
        "real_tokens_per_s": tokens["real"] / seconds,
        "supervised_tokens_per_s": tokens["supervised"] / seconds,
        "all_tokens_per_s": tokens["all"] / seconds,
        "weights_mb": weights_mb,
        **planner,
        "attention": net.config._attn_implementation,
        "device": device.environment_report()["device"],
        **_peak_memory(),
    }


def _child(queue, *args):
    try:
        queue.put(run_variant(*args))
    except BaseException as error:  # report it to the parent rather than leave it waiting
        queue.put({"error": f"{type(error).__name__}: {error}"})
        raise


# What each run measures that varies with a busy machine: reported as the median over the repeated runs.
RATES = ("real_tokens_per_s", "supervised_tokens_per_s", "all_tokens_per_s", "seconds_per_step", "peak_memory_mb")


def _run_in_fresh_process(context, variant, *args) -> dict:
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, variant, *args))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"The {variant!r} run failed: {result['error']}")
    return result


def median_run(runs: list[dict]) -> dict:
    """One variant's runs as one: the first run's fields, each rate replaced by its median, and the spread.

    ``spread_%`` is (max - min) / median of each rate: how much a busy machine moved it between runs.
    """
    import statistics

    summary = dict(runs[0])
    summary["runs"] = len(runs)
    summary["spread_%"] = {}
    for key in RATES:
        values = [run[key] for run in runs]
        summary[key] = statistics.median(values)
        summary["spread_%"][key] = 100 * (max(values) - min(values)) / summary[key] if summary[key] else 0.0
    return summary


def benchmark(
    model: str = "tiny",
    preset: str | None = None,
    steps: int = 20,
    batch_size: int | None = None,
    max_length: int | None = None,
    repeats: int = 3,
    dataset: str | None = None,
) -> dict:
    """Run every variant, each in a fresh process, and report course/baseline ratios and the planner's error.

    The baseline and the course run ``repeats`` times each, interleaved (baseline, course, baseline, course, ...),
    so that a busy moment of a shared machine slows both rather than one; the ratios are taken from the medians.
    The worst case (course at max_length) runs once: it serves the planner's check, not a ratio.
    """
    import torch

    if model in SHAPED and not torch.cuda.is_available():
        raise RuntimeError(
            f"The {model}-shaped benchmark trains a {model.split('-')[-1].upper()} model: it needs a GPU. "
            "On a CPU, use --model tiny or --model mid."
        )
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: run each variant at least once.")
    preset = preset or {**SHAPED, **REAL}.get(model, "tiny")
    # Idle OpenMP threads sleep rather than spin: on a CPU the runs are timed in CPU time, and spinning while
    # waiting for a descheduled sibling thread would count a busy machine's delays as work. Children inherit it.
    saved_policy = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        return _benchmark(model, preset, steps, batch_size, max_length, repeats, dataset)
    finally:
        if saved_policy is None:
            os.environ.pop("OMP_WAIT_POLICY")
        else:
            os.environ["OMP_WAIT_POLICY"] = saved_policy


def ratios(ours: dict, base: dict) -> dict:
    """One variant's medians over another's: above 1 is faster (or, for memory, more)."""
    return {
        "real_tokens_per_s": ours["real_tokens_per_s"] / base["real_tokens_per_s"],
        "supervised_tokens_per_s": ours["supervised_tokens_per_s"] / base["supervised_tokens_per_s"],
        "all_tokens_per_s": ours["all_tokens_per_s"] / base["all_tokens_per_s"],
        "steps_per_s": base["seconds_per_step"] / ours["seconds_per_step"],
        "peak_memory": ours["peak_memory_mb"] / base["peak_memory_mb"],
    }


def _benchmark(model, preset, steps, batch_size, max_length, repeats, dataset) -> dict:
    import multiprocessing

    import torch

    context = multiprocessing.get_context("spawn")
    args = (model, preset, steps, batch_size, max_length, dataset)
    runs = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant in INTERLEAVED:
            runs[variant].append(_run_in_fresh_process(context, variant, *args))
    runs[VARIANTS[-1]].append(_run_in_fresh_process(context, VARIANTS[-1], *args))
    results = {variant: median_run(variant_runs) for variant, variant_runs in runs.items()}
    base, ours, packed, full = (results[v] for v in VARIANTS)
    planner = {
        "weights_error_%": 100 * (full["planned_weights_mb"] / full["weights_mb"] - 1),
        "activations_error_%": 100 * (full["planned_activations_mb"] / full["activations_mb"] - 1),
        # Only a GPU's peak is what the planner estimates; a CPU's peak RSS also counts Python and its libraries.
        "peak_error_%": 100 * (full["planned_peak_mb"] / full["peak_memory_mb"] - 1)
        if torch.cuda.is_available()
        else None,
    }
    settings = {"model": model, "preset": preset, "steps": steps, "warmup_steps": WARMUP_STEPS, "repeats": repeats}
    settings |= {key: ours[key] for key in ("dataset", "batch_size", "max_length", "gradient_checkpointing")}
    per_run = {v: [run["real_tokens_per_s"] for run in variant_runs] for v, variant_runs in runs.items()}
    return {
        "settings": settings,
        **results,
        "ratio_course_over_baseline": ratios(ours, base),
        "ratio_packing_over_baseline": ratios(packed, base),
        "planner": planner,
        "real_tokens_per_s_of_each_run": per_run,
    }


def markdown_table(result: dict) -> str:
    """The measurements side by side, with the ratios and the planner's error."""
    b, c, k, f = (result[v] for v in VARIANTS)
    r, q = result["ratio_course_over_baseline"], result["ratio_packing_over_baseline"]
    p, s = result["planner"], result["settings"]
    rows = [
        (
            "optimizer steps / s",
            "steps_per_s",
            1 / b["seconds_per_step"],
            1 / c["seconds_per_step"],
            1 / k["seconds_per_step"],
        ),
        (
            "real tokens / s",
            "real_tokens_per_s",
            b["real_tokens_per_s"],
            c["real_tokens_per_s"],
            k["real_tokens_per_s"],
        ),
        (
            "supervised tokens / s",
            "supervised_tokens_per_s",
            b["supervised_tokens_per_s"],
            c["supervised_tokens_per_s"],
            k["supervised_tokens_per_s"],
        ),
        (
            "all tokens / s (with padding)",
            "all_tokens_per_s",
            b["all_tokens_per_s"],
            c["all_tokens_per_s"],
            k["all_tokens_per_s"],
        ),
        ("peak memory (MB)", "peak_memory", b["peak_memory_mb"], c["peak_memory_mb"], k["peak_memory_mb"]),
    ]
    memory = "CUDA max reserved" if "peak_allocated_mb" in c else "peak RSS of the process"
    lines = [
        f"Model `{s['model']}` with preset `{s['preset']}`, data `{s['dataset']}`: batch {s['batch_size']}, "
        f"max_length {s['max_length']}, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, {s['steps']} timed steps after "
        f"{s['warmup_steps']} untimed ones, on {c['device']}, timed in {c['clock']}. Peak memory: {memory}. "
        f"Baseline, course and course + packing ran "
        f"{s['repeats']} times each, interleaved, each run in a fresh process: medians, ratios of the medians. Spread "
        f"of real tokens / s between runs, (max - min) / median: baseline {b['spread_%']['real_tokens_per_s']:.0f}%, "
        f"course {c['spread_%']['real_tokens_per_s']:.0f}%, packing {k['spread_%']['real_tokens_per_s']:.0f}%.",
        "",
        "| | baseline (Llama-2 about-me recipe) | course | course + packing | course / baseline | packing / baseline |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {x:,.1f} | {y:,.1f} | {z:,.1f} | {r[key]:.2f}x | {q[key]:.2f}x |" for name, key, x, y, z in rows
    ]
    gpu = p["peak_error_%"] is not None
    lines += [
        "",
        f"Course at max_length (every example {s['max_length']} tokens): {f['real_tokens_per_s']:,.0f} tokens/s, "
        f"peak {f['peak_memory_mb']:,.0f} MB. The memory planner against what was measured:",
        "",
        "| | planned (MB) | measured (MB) | planner error |",
        "|---|---|---|---|",
        f"| weights, as training holds them | {f['planned_weights_mb']:,.1f} | {f['weights_mb']:,.1f} | "
        f"{p['weights_error_%']:+.1f}% |",
        f"| kept for backward, one example, no checkpointing | {f['planned_activations_mb']:,.1f} | "
        f"{f['activations_mb']:,.1f} | {p['activations_error_%']:+.1f}% |",
        f"| peak of training | {f['planned_peak_mb']:,.0f} | "
        + (f"{f['peak_memory_mb']:,.0f} | {p['peak_error_%']:+.1f}% |" if gpu else "— | not compared on a CPU |"),
    ]
    if not gpu:
        lines += ["", "The planner estimates a GPU's peak; a CPU's peak RSS also counts Python and its libraries."]
    return "\n".join(lines)


def write_results(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(out_dir / "bench.json", result)
    (out_dir / "bench.md").write_text(markdown_table(result) + "\n")
    return out_dir / "bench.json", out_dir / "bench.md"
