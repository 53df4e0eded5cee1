"""The GPU script's benchmark (``.ci/gpu-bench``): every recipe on one loaded model, one JSON line per run.

``python -m lora_helpers sweep --model llama-3.1-8b --out DIR`` (``.ci/gpu-bench``; CI dry-runs it on ``tiny``).
``bench`` runs each variant in a fresh process, so that each peak of memory is its own; a GPU lent for 15 minutes
cannot load an 8B model a dozen times, so here the base model is loaded once and every run gets fresh adapters from
the same seed (``training.base_for_training`` + ``training.lora_config``, taken off again with peft's ``unload``).

Each run trains the same examples for two epochs and times the second (the first builds kernels and warms the
allocator; every variant sees the same examples in it), synchronising the GPU at every step; then two more steps
run under torch's profiler for the GPU-busy time and the number of GPU kernels (on a CPU, operators) per step, and
the run stops. Losses of the first epoch are kept so that two recipes of the same arithmetic can be compared.

Variants (notebook 04 teaches the course's recipe; ``bench`` describes the baseline):

- ``baseline``: the Llama-2 about-me recipe (``bench.baseline_trainer``), every example padded to ``max_length``;
- ``course``: notebook 04's ``SFTTrainer`` recipe (``training.sft_config``);
- ``course + packing``: several whole examples per row (notebook 04, "Packing");
- ``course, larger batch``: the per-device batch times the gradient accumulation of the preset (the same
  examples per optimizer step, in one pass instead of several);
- ``course + liger`` and ``course + packing + liger`` (CUDA only): Liger's Triton kernels (RMSNorm, RoPE, SwiGLU;
  TRL keeps its own fused output layer for the loss) through ``use_liger_kernel``. Liger patches the loaded model for good, so these run
  last, after a check that its loss and LoRA gradients match the plain model's on one batch.

Data shapes: ``short`` (the about-me questions), ``mixed`` (the shipped Guanaco sample: lengths up to 512) and
``full`` (every example exactly ``max_length`` tokens, the planner's worst case). The runs of each shape's main
variants are interleaved (baseline, course, packing, baseline, ...); ``--budget-s`` skips a run that would end
past the budget (written as a ``skipped`` line), so a lent GPU's time is never cut off mid-run.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from lora_helpers import bench, presets

SHAPES = {"short": "package:about_me.jsonl", "mixed": bench.OFFLINE_DATASET, "full": None}
MAIN = ("baseline", "course", "course + packing")
LARGER = "course, larger batch"
LIGER = ("course + liger", "course + packing + liger")
TIMED_EPOCH, PROFILED_STEPS = 1, 2  # epochs count from 0: the second epoch is timed, then 2 profiled steps


class StepClock(TrainerCallback):
    """Times the second epoch step by step (synchronising a GPU), then profiles two steps and stops training.

    ``hook`` (a forward pre-hook) counts the tokens of every batch, with the epoch it belongs to.
    """

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.epoch, self.batches, self.step_ends, self.losses = -1, [], [], []
        self.start = self.profiler = self.profile = None
        self.profiled = 0
        self.memory = {}

    def _now(self) -> float:
        """The wall clock on a GPU (synchronised); on a CPU this process's CPU time, as ``bench._Meter`` explains."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def hook(self, module, args, kwargs):
        self.batches.append({"epoch": self.epoch, **bench.batch_tokens(kwargs)})

    def on_train_begin(self, args, state, control, **kwargs):
        self.memory["at_start_mb"] = _allocated_mb()

    def on_epoch_begin(self, args, state, control, **kwargs):
        import torch

        self.epoch += 1
        if self.epoch == TIMED_EPOCH:
            self.start = self._now()
        elif self.epoch == TIMED_EPOCH + 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.memory["after_first_step_mb"] = _allocated_mb()  # the optimizer's states now exist
        if self.epoch < TIMED_EPOCH:
            control.should_log = True  # the first epoch's losses, step by step (untimed)
        elif self.epoch == TIMED_EPOCH:
            self.step_ends.append(self._now())
        else:
            self.profiled += 1
            if self.profiled == PROFILED_STEPS:
                self._now()
                self.profiler.__exit__(None, None, None)
                self.profile = _profile_summary(self.profiler, self.cuda, self.profiled)
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None and self.profile is None:  # an epoch shorter than the profiled steps
            self._now()
            self.profiler.__exit__(None, None, None)
            self.profile = _profile_summary(self.profiler, self.cuda, self.profiled) if self.profiled else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.epoch < TIMED_EPOCH:
            self.losses.append(logs["loss"])

    def measurements(self) -> dict:
        timed = [b for b in self.batches if b["epoch"] == TIMED_EPOCH]
        tokens = {key: sum(b[key] for b in timed) for key in ("all", "real", "supervised")}
        if not self.step_ends:
            raise RuntimeError("The timed epoch ran no step: give the run more examples.")
        seconds = self.step_ends[-1] - self.start
        steps = [b - a for a, b in zip([self.start, *self.step_ends], self.step_ends)]
        return {
            "timed_steps": len(steps),
            "seconds": seconds,
            "steps_per_s": len(steps) / seconds,
            "real_tokens_per_s": tokens["real"] / seconds,
            "supervised_tokens_per_s": tokens["supervised"] / seconds,
            "all_tokens_per_s": tokens["all"] / seconds,
            "real_tokens": tokens["real"],
            "supervised_tokens": tokens["supervised"],
            "all_tokens": tokens["all"],
            "step_ms": _spread([1000 * s for s in steps]),
            "first_epoch_losses": self.losses,
            **(self.profile or {}),
        }


def _allocated_mb() -> float | None:
    import torch

    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _spread(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median": statistics.median(values), "p10": pick(0.1), "p90": pick(0.9), "max": ordered[-1]}


def _profile_summary(profiler, cuda: bool, steps: int) -> dict:
    """GPU-busy milliseconds and GPU kernels per step (on a CPU: operators dispatched per step)."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.self_device_time_total for e in kernels)
        return {
            "gpu_busy_ms_per_step": busy_us / 1000 / steps,
            "kernels_per_step": sum(e.count for e in kernels) / steps,
        }
    operators = sum(e.count for e in events if e.key.startswith("aten::"))
    return {"gpu_busy_ms_per_step": None, "operators_per_step": operators / steps}


def shape_settings(model: str, preset: str, shape: str, max_length: int | None = None):
    dataset = SHAPES[shape] or SHAPES["short"]  # "full" makes its own rows; the settings need some dataset
    overrides = {"max_length": max_length} if max_length else {}
    return presets.resolve_settings(
        preset, model_id=bench.model_dir(model), dataset=dataset, eval_fraction=0.0, **overrides
    )


def shape_examples(settings, tokenizer, shape: str, examples: int):
    """``examples`` training examples of this data shape (a small data set repeated in order to reach it)."""
    from datasets import concatenate_datasets

    from lora_helpers import training

    if shape == "full":
        return bench.full_length_dataset(tokenizer, examples, settings.max_length)
    train = training.prepare_datasets(settings, tokenizer).train
    copies = -(-examples // len(train))
    return concatenate_datasets([train] * copies).select(range(examples))


def larger_batch(settings) -> int:
    """The preset's examples per optimizer step in one pass (batch x accumulation), or twice its batch."""
    batch, accumulation = settings.per_device_train_batch_size, settings.gradient_accumulation_steps
    return batch * accumulation if accumulation > 1 else 2 * batch


def _trainer(variant, net, tokenizer, settings, train, scratch, clock):
    from trl import SFTTrainer

    from lora_helpers import training

    epochs = dict(num_train_epochs=TIMED_EPOCH + 2, save_strategy="no", logging_strategy="no")
    if variant == "baseline":  # its seed is 0 too
        return bench.baseline_trainer(net, tokenizer, settings, train, scratch, epochs, clock)
    extra = {"packing": True} if "packing" in variant else {}
    if "liger" in variant:
        extra["use_liger_kernel"] = True
    args = training.sft_config(settings, scratch, evaluation=False, seed=0, **epochs, **extra)
    trainer = SFTTrainer(model=net, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[clock])
    training.adapter_weights_to_float32(trainer.model)
    return trainer


def run_once(variant: str, base, tokenizer, settings, train) -> dict:
    """Fresh adapters (seed 0) on ``base``, two epochs and two profiled steps of ``variant``; the adapters go."""
    import dataclasses

    import torch

    from lora_helpers import training

    if variant == LARGER:
        settings = dataclasses.replace(settings, per_device_train_batch_size=larger_batch(settings))
    settings = dataclasses.replace(settings, gradient_accumulation_steps=1)
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    with training.fresh_adapters(base, training.lora_config(settings, base), seed=0) as net:
        handle = net.register_forward_pre_hook(clock.hook, with_kwargs=True)
        try:
            trainer = _trainer(variant, net, tokenizer, settings, train, tempfile.mkdtemp(prefix="lora-sweep-"), clock)
            trainer.train()
            result = {
                "variant": variant,
                "batch_size": settings.per_device_train_batch_size,
                "max_length": settings.max_length,
                "examples": len(train),
                **clock.measurements(),
                "memory_mb": {**clock.memory, **_peaks()},
            }
        finally:
            handle.remove()
    return result


def _peaks() -> dict:
    import resource

    import torch

    if torch.cuda.is_available():
        return {
            "max_allocated": torch.cuda.max_memory_allocated() / 2**20,
            "max_reserved": torch.cuda.max_memory_reserved() / 2**20,
        }
    return {"peak_rss_of_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def liger_matches_plain(base, tokenizer, settings, train) -> dict:
    """Loss and LoRA gradients on one batch, plain and then with Liger's kernels applied to ``base`` (for good)."""
    import dataclasses

    import torch
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from peft import get_peft_model
    from transformers import set_seed

    from lora_helpers import chat, training

    settings = dataclasses.replace(settings, lora_dropout=0.0)
    set_seed(0)
    net = get_peft_model(base, training.lora_config(settings, base))
    for name, parameter in net.named_parameters():  # B != 0, so that A's gradients are not all zero
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    rows = [
        chat.template_ids(tokenizer, ex["prompt"] + ex["completion"])[: settings.max_length]
        for ex in train.select(range(1))
    ]
    ids = torch.tensor(rows, device=net.device)

    def loss_and_gradients():
        net.zero_grad(set_to_none=True)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in net.named_parameters() if p.requires_grad}
        return loss.item(), grads

    net.train()
    plain_loss, plain = loss_and_gradients()
    # the layer kernels only, as SFTTrainer applies them (its own fused LM head computes the loss)
    _apply_liger_kernel_to_instance(model=net.get_base_model(), fused_linear_cross_entropy=False)
    liger_loss, liger = loss_and_gradients()
    difference = torch.sqrt(sum(((liger[n] - plain[n]) ** 2).sum() for n in plain))
    norm = torch.sqrt(sum((plain[n] ** 2).sum() for n in plain))
    net.unload()
    return {
        "check": "liger against plain, one batch",
        "plain_loss": plain_loss,
        "liger_loss": liger_loss,
        "loss_difference": abs(liger_loss - plain_loss),
        "gradient_relative_error": float(difference / norm),
    }


def _device_line() -> dict:
    import torch

    from lora_helpers import device

    return {
        "device": device.environment_report()["device"],
        "dtype": str(device.compute_dtype()).removeprefix("torch."),
        "torch": torch.__version__,
    }


def sweep(
    out: str | Path,
    model: str = "tiny",
    preset: str | None = None,
    shapes: tuple[str, ...] = ("mixed", "short", "full"),
    repeats: int = 2,
    examples: int = 24,
    max_length: int | None = None,
    budget_s: float = 480.0,
    liger: bool | None = None,
) -> Path:
    """Run every variant on ``model`` loaded once; write ``out/sweep.jsonl`` line by line and ``out/sweep.md``.

    ``liger``: None runs Liger's variants where they can run (a CUDA GPU with ``liger_kernel`` installed).
    """
    import importlib.util

    import torch

    from lora_helpers import device, models, plan, training

    started = time.perf_counter()
    preset = preset or {**bench.SHAPED, **bench.REAL}.get(model, "tiny")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = out / "sweep.jsonl"
    lines.write_text("")
    if liger is None:
        liger = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None

    def write(record: dict) -> None:
        with lines.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    settings = shape_settings(model, preset, shapes[0], max_length)
    tokenizer = models.load_tokenizer(settings.model_id, chat_format=settings.chat_format)
    base = training.base_for_training(settings)
    loaded = {
        "model": model,
        "preset": preset,
        "load_seconds": time.perf_counter() - started,
        "weights_allocated_mb": _allocated_mb(),
        **_device_line(),
    }
    compute_bytes = torch.finfo(device.compute_dtype()).bits // 8  # as bench.run_variant sizes the plan
    planned = plan.plan(settings, compute_bytes, gpu=torch.cuda.is_available())
    loaded["planner"] = {"peak_gb": planned["peak_gb"], "parts_gb": planned["parts_gb"]}
    write({"loaded": loaded})

    seconds_of = {}  # the last run's seconds per variant, to keep within the budget

    def run(shape, variant, train, settings, repeat):
        guess = seconds_of.get(variant, 0.0)
        if time.perf_counter() - started + guess > budget_s:
            write(
                {"shape": shape, "variant": variant, "repeat": repeat, "skipped": f"past the {budget_s:.0f} s budget"}
            )
            return
        began = time.perf_counter()
        try:
            record = run_once(variant, base, tokenizer, settings, train)
        except Exception as error:  # one recipe failing must not lose the others' measurements
            write({"shape": shape, "variant": variant, "repeat": repeat, "error": f"{type(error).__name__}: {error}"})
            return
        seconds_of[variant] = time.perf_counter() - began
        write({"model": model, "shape": shape, "repeat": repeat, **record, "run_seconds": seconds_of[variant]})

    data = {}
    for shape in shapes:
        settings = shape_settings(model, preset, shape, max_length)
        data[shape] = (settings, shape_examples(settings, tokenizer, shape, examples))
        variants = ("baseline", "course") if shape == "full" else MAIN  # full rows: packing changes nothing
        for repeat in range(repeats if shape == shapes[0] else 1):
            for variant in variants:
                run(shape, variant, data[shape][1], settings, repeat)
        if shape == shapes[0]:
            run(shape, LARGER, data[shape][1], settings, 0)
    if liger:
        shape = shapes[0]
        settings, train = data[shape]
        try:
            write(liger_matches_plain(base, tokenizer, settings, train))
        except Exception as error:
            write({"check": "liger against plain, one batch", "error": f"{type(error).__name__}: {error}"})
        for variant in LIGER:
            run(shape, variant, train, settings, 0)
    write({"finished_seconds": time.perf_counter() - started})
    (out / "sweep.md").write_text(markdown(read_lines(lines)) + "\n")
    return lines


def read_lines(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarize(records: list[dict]) -> dict:
    """Medians per (shape, variant) of the measured runs, and ratios to the same shape's baseline."""
    runs = {}
    for record in records:
        if "real_tokens_per_s" in record:
            runs.setdefault((record["shape"], record["variant"]), []).append(record)
    table = {}
    for (shape, variant), group in runs.items():
        median = lambda key, group=group: statistics.median(r[key] for r in group)  # noqa: E731
        table[(shape, variant)] = {
            "runs": len(group),
            "real_tokens_per_s": median("real_tokens_per_s"),
            "supervised_tokens_per_s": median("supervised_tokens_per_s"),
            "steps_per_s": median("steps_per_s"),
            "step_ms_median": statistics.median(r["step_ms"]["median"] for r in group),
            "step_ms_p90": max(r["step_ms"]["p90"] for r in group),
            "spread_%": 100
            * (max(r["real_tokens_per_s"] for r in group) - min(r["real_tokens_per_s"] for r in group))
            / median("real_tokens_per_s"),
            "gpu_busy_ms_per_step": group[0].get("gpu_busy_ms_per_step"),
            "kernels_per_step": group[0].get("kernels_per_step", group[0].get("operators_per_step")),
            "max_allocated_mb": group[0]["memory_mb"].get("max_allocated"),
            "max_reserved_mb": group[0]["memory_mb"].get("max_reserved"),
        }
    for (shape, _variant), row in table.items():
        base = table.get((shape, "baseline"))
        row["real_tokens_ratio"] = row["real_tokens_per_s"] / base["real_tokens_per_s"] if base else None
    return table


def markdown(records: list[dict]) -> str:
    """The sweep as a table: one row per shape and variant, medians and ratios to the baseline."""
    loaded = next((r["loaded"] for r in records if "loaded" in r), {})
    table = summarize(records)
    fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    lines = [
        f"Model `{loaded.get('model')}` (preset `{loaded.get('preset')}`) on {loaded.get('device')}, "
        f"{loaded.get('dtype')}, loaded once; each run: fresh adapters (seed 0), two epochs of the same examples, "
        "the second timed with the device synchronised at every step. Medians over the runs; ratios to the same "
        "data's baseline.",
        "",
        "| data | variant | runs | real tokens/s | × baseline | supervised tokens/s | steps/s | step ms (median, "
        "p90) | GPU-busy ms/step | kernels (CPU: ops)/step | max allocated MB | max reserved MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, variant), row in table.items():
        lines.append(
            f"| {shape} | {variant} | {row['runs']} | {row['real_tokens_per_s']:,.0f} | "
            f"{fmt(row['real_tokens_ratio'], '.2f')}× | {row['supervised_tokens_per_s']:,.0f} | "
            f"{row['steps_per_s']:.2f} | {row['step_ms_median']:.0f}, {row['step_ms_p90']:.0f} | "
            f"{fmt(row['gpu_busy_ms_per_step'], ',.1f')} | {fmt(row['kernels_per_step'], ',.0f')} | "
            f"{fmt(row['max_allocated_mb'], ',.0f')} | {fmt(row['max_reserved_mb'], ',.0f')} |"
        )
    for record in records:
        if "check" in record:
            lines += ["", f"Liger check: {json.dumps(record)}"]
        if "error" in record or "skipped" in record:
            lines += ["", f"Not measured: {json.dumps(record)}"]
    return "\n".join(lines)
