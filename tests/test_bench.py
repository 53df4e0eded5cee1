"""The benchmark measures what the model is given; its speed ratios are measurements for the README, not assertions."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_helpers import bench, plan, sweep, tiny

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_every_recipe_and_writes_results(tmp_path, tiny_dir):
    result = bench.benchmark("tiny", steps=4, repeats=2)
    base, ours, packed, full = (result[v] for v in bench.VARIANTS)
    assert base["steps"] == ours["steps"] == packed["steps"] == full["steps"] == 4
    assert (base["runs"], ours["runs"], packed["runs"], full["runs"]) == (
        2,
        2,
        2,
        1,
    )  # interleaved; the worst case once
    assert ours["clock"] == "CPU time of the process"  # a busy machine's other processes do not count on a CPU
    assert "OMP_WAIT_POLICY" not in os.environ  # set for the children only, then restored
    each = result["real_tokens_per_s_of_each_run"]
    assert len(each["baseline"]) == len(each["course"]) == 2
    assert min(each["course"]) <= ours["real_tokens_per_s"] <= max(each["course"])  # the median of the runs
    # Counted from the batches the model was given, over the timed steps only:
    assert base["all_tokens"] == 4 * 8 * 128  # the Llama-2 about-me recipe pads every example to max_length
    assert ours["all_tokens"] < 0.5 * base["all_tokens"]  # the course pads each batch to its longest example
    assert full["all_tokens"] == full["real_tokens"] == 4 * 8 * 128  # the worst case fills max_length, no padding
    assert packed["all_tokens"] == packed["real_tokens"]  # packed rows carry no padding at all
    assert packed["real_tokens"] > 2 * ours["real_tokens"]  # several examples per row: more real tokens per step
    assert 0 < packed["supervised_tokens"] < packed["real_tokens"]  # still the answers only
    assert base["supervised_tokens"] == base["real_tokens"]  # the Llama-2 about-me recipe: loss on every token
    assert 0 < ours["supervised_tokens"] < ours["real_tokens"]  # the course: loss on the answers only
    assert full["supervised_tokens"] == 4 * 8 * 64
    assert ours["attention"] == "sdpa"
    for key in ("real_tokens_per_s", "supervised_tokens_per_s", "steps_per_s", "peak_memory"):
        assert result["ratio_course_over_baseline"][key] > 0 and result["ratio_packing_over_baseline"][key] > 0
    # The planner's weight estimate against the loaded model (fp32 on a CPU); absmax scales are not in the footprint
    assert abs(result["planner"]["weights_error_%"]) < 5
    assert abs(result["planner"]["activations_error_%"]) < 15  # the planner's activation model, checked
    assert result["planner"]["peak_error_%"] is None  # a CPU's peak RSS is not what the planner estimates
    json_path, md_path = bench.write_results(result, tmp_path)
    assert json.loads(json_path.read_text())["settings"]["batch_size"] == 8
    table = md_path.read_text()
    assert (
        "| real tokens / s |" in table
        and "packing / baseline" in table
        and "| kept for backward, one example, no checkpointing |" in table
    )


def test_a_gpu_preset_runs_its_own_settings_offline(tiny_dir):
    """What a 7B-shaped GPU run does, on the mid model: the preset's batch, length and checkpointing, no download."""
    result = bench.run_variant("course at max_length", "mid", "llama3.1-8b", 2, None, None)
    assert result["dataset"] == bench.OFFLINE_DATASET  # the preset's no_robots is on the Hub
    assert result["gradient_checkpointing"] and result["batch_size"] == 1 and result["max_length"] == 512
    assert result["all_tokens"] == result["real_tokens"] == 2 * 512
    # Measured with checkpointing switched off for one pass, then on again for training. The planner counts
    # the inputs of every linear layer (frozen layers without an adapter do not keep theirs) and LoRA dropout's
    # copies and masks; with adapters on q,k,v,o it errs high (the safe side for "will it fit?"):
    assert 0 <= result["planned_activations_mb"] / result["activations_mb"] - 1 < 0.3


def test_shaped_models_need_a_gpu():
    with pytest.raises(RuntimeError, match="needs a GPU"):
        bench.benchmark("llama-2-7b")


def test_random_model_has_the_config_shapes_and_loads_in_4bit(tmp_path, tiny_tokenizer):
    """The writer of the 7B/8B-shaped models, on a shrunken Llama-2 config, with shards forced small."""
    from lora_helpers import lora, models

    config = plan.load_config("NousResearch/Llama-2-7b-chat-hf")
    config.update(dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4))
    config.update(dict(num_key_value_heads=4, vocab_size=1024, pad_token_id=tiny_tokenizer.pad_token_id))
    target = tiny.write_random_model(config, tmp_path / "shaped", tiny_tokenizer, max_shard_bytes=200_000)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = models.load_model(str(target), load_in_4bit=True)
    assert model.config.hidden_size == 128 and model.config.vocab_size == 1024
    assert {type(m).__name__ for m in lora.linear_layers(model).values()} == {"Linear4bit"}
    shapes = {name: (m.in_features, m.out_features) for name, m in lora.linear_layers(model).items()}
    meta = {name: (m.in_features, m.out_features) for name, m in lora.linear_layers(plan.meta_model(config)).items()}
    assert shapes == meta
    embedding = model.get_input_embeddings().weight.float()
    assert abs(embedding.std().item() - config.initializer_range) < 0.002  # random, not zeros
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_padding_free_batches_are_exact_with_sdpa_only_without_a_cache(tiny_dir, tiny_tokenizer):
    """Why the course groups by length rather than use trl's padding_free on SDPA (notebook 04).

    A padding-free batch is one row with position_ids restarting at each example. transformers turns that into a
    block-diagonal mask only when no cache is passed: trl's trainer passes use_cache=False, a plain forward does not.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from lora_helpers import models

    model = models.load_model("tiny", load_in_4bit=False)
    examples = [{"input_ids": tiny_tokenizer(t)["input_ids"]} for t in ("Where do you live?", "Hi.", "What is LoRA?")]
    padded = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id, padding_free=True)(examples)
    flat = {k: flat[k] for k in ("input_ids", "position_ids", "labels")}
    with torch.no_grad():
        reference = model(**padded).logits[padded["attention_mask"].bool()]
        exact = model(**flat, use_cache=False).logits[0]
        leaky = model(**flat, use_cache=True).logits[0]
    assert (exact - reference).abs().max() < 1e-4
    assert (leaky - reference).abs().max() > 1e-2  # later examples attend to earlier ones


def test_median_run_takes_the_median_of_each_rate_and_reports_the_spread():
    runs = [{key: value for key in bench.RATES} | {"steps": 4} for value in (1.0, 10.0, 3.0)]
    summary = bench.median_run(runs)
    assert all(summary[key] == 3.0 for key in bench.RATES)  # one busy run (10.0) does not move the median
    assert summary["spread_%"]["real_tokens_per_s"] == pytest.approx(100 * 9 / 3)
    assert summary["runs"] == 3 and summary["steps"] == 4


def test_the_gpu_script_dry_runs_on_tiny_with_one_line_per_run(tmp_path, tiny_dir):
    """``.ci/gpu-bench --dry-run``: the script a lent GPU runs, on tiny on the CPU: every recipe on every data shape,
    each run with fresh adapters on the one loaded model, written line by line, and the table."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", ".ci/gpu-bench", "--dry-run", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = sweep.read_lines(tmp_path / "sweep.jsonl")
    loaded = records[0]["loaded"]
    assert loaded["model"] == "tiny" and loaded["planner"]["peak_gb"] > 0
    runs = [r for r in records if "real_tokens_per_s" in r]
    expected = {(shape, variant) for shape in ("mixed", "short") for variant in sweep.MAIN}
    expected |= {("mixed", sweep.LARGER), ("full", "baseline"), ("full", "course")}
    assert {(r["shape"], r["variant"]) for r in runs} == expected  # no Liger on a CPU, no error, nothing skipped
    assert not [r for r in records if "error" in r or "skipped" in r]
    for r in runs:
        assert r["timed_steps"] >= 1 and r["operators_per_step"] > 100 and r["gpu_busy_ms_per_step"] is None
        assert 0 < r["supervised_tokens"] <= r["real_tokens"] <= r["all_tokens"]
        assert r["first_epoch_losses"] and all(math.isfinite(loss) for loss in r["first_epoch_losses"])
    for shape in ("mixed", "short", "full"):  # every recipe's timed epoch holds the same examples
        assert len({r["real_tokens"] for r in runs if r["shape"] == shape}) == 1
    by = {(r["shape"], r["variant"], r["repeat"]): r for r in runs}
    # the baseline pads to max_length and learns every token; the course pads to the batch, learns the answers
    assert by["short", "baseline", 0]["all_tokens"] > by["short", "course", 0]["all_tokens"]
    assert by["short", "baseline", 0]["supervised_tokens"] > by["short", "course", 0]["supervised_tokens"]
    # packing: the same examples in fewer, fuller rows
    assert by["short", "course + packing", 0]["timed_steps"] < by["short", "course", 0]["timed_steps"]
    # a repeat gets fresh adapters from the same seed on an unchanged base: the same losses
    for variant in sweep.MAIN:
        first, second = by["mixed", variant, 0], by["mixed", variant, 1]
        assert first["first_epoch_losses"] == pytest.approx(second["first_epoch_losses"], rel=1e-5)
    assert "| mixed | course + packing | 2 |" in (tmp_path / "sweep.md").read_text()


def test_sweep_table_reports_medians_ratios_and_what_was_not_measured():
    def run(variant, rate, repeat=0):
        return {
            "shape": "mixed",
            "variant": variant,
            "repeat": repeat,
            "real_tokens_per_s": rate,
            "supervised_tokens_per_s": rate / 2,
            "steps_per_s": 1.0,
            "step_ms": {"median": 500.0, "p90": 600.0},
            "gpu_busy_ms_per_step": 100.0,
            "kernels_per_step": 12000.0,
            "memory_mb": {"max_allocated": 6000.0, "max_reserved": 7000.0},
        }

    records = [
        {"loaded": {"model": "llama-3.1-8b", "preset": "llama3.1-8b", "device": "NVIDIA H200", "dtype": "float16"}},
        run("baseline", 100.0),
        run("baseline", 300.0, 1),
        run("baseline", 200.0, 2),
        run("course + packing", 900.0),
        {"shape": "full", "variant": "course", "repeat": 0, "skipped": "past the 470 s budget"},
    ]
    table = sweep.summarize(records)
    assert table["mixed", "baseline"]["real_tokens_per_s"] == 200.0  # the median
    assert table["mixed", "baseline"]["spread_%"] == pytest.approx(100.0)  # (300 - 100) / 200
    assert table["mixed", "course + packing"]["real_tokens_ratio"] == pytest.approx(4.5)
    text = sweep.markdown(records)
    assert "| mixed | course + packing | 1 | 900 | 4.50× |" in text and "past the 470 s budget" in text


def test_the_command_line_offers_the_benchmark_models():
    from lora_helpers import __main__ as cli

    assert cli.BENCH_MODELS == list(bench.MODELS)
