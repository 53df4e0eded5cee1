"""The benchmark runs and reports; its speed ratios are measurements for the README, not assertions here."""

import json

from lora_helpers import bench


def test_benchmark_runs_both_recipes_and_writes_results(tmp_path, tiny_dir):
    result = bench.benchmark("tiny", steps=4)
    base, ours = result["baseline"], result["course"]
    assert base["steps"] == ours["steps"] == 4
    # What makes the difference, deterministically: the baseline pads every example to max_length.
    assert base["all_tokens"] == 4 * 8 * 128
    assert ours["all_tokens"] < 0.5 * base["all_tokens"]
    assert ours["supervised_tokens"] < base["supervised_tokens"]  # the course learns from the answers only
    for key in ("real_tokens_per_s", "supervised_tokens_per_s", "steps_per_s", "peak_memory"):
        assert result["ratio_course_over_baseline"][key] > 0
    json_path, md_path = bench.write_results(result, tmp_path)
    assert json.loads(json_path.read_text())["settings"]["model"] == "tiny"
    assert "| real tokens / s |" in md_path.read_text()
