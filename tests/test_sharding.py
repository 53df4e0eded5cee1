"""FSDP2 on the tiny 4-bit model with two CPU processes (gloo): PyTorch's own `fully_shard`, as the trainer uses it
on GPUs under the shipped FSDP configuration (accelerate's FSDP on CPUs becomes plain DDP, so it is done here)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.course


def rehearse(tmp_path, processes: int, *extra) -> dict:
    out = tmp_path / f"fsdp-{processes}{''.join(extra)}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += ["-m", "lora_helpers.sharding", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_shards_train_as_one_whole_model(tmp_path):
    whole = rehearse(tmp_path, 1)
    sharded = rehearse(tmp_path, 2)
    assert not whole["sharded"] and sharded["sharded"] and sharded["fsdp_units"] == 3  # 2 decoder layers + root
    assert sharded["storage_dtype"] == "float32"  # the packed 4-bit weights in a float dtype FSDP can shard
    # each process holds half of every weight, 4-bit ones included
    assert sharded["weight_bytes_by_process"] == [whole["weight_bytes_per_process"] // 2] * 2
    # the same gradient, averaged across the processes: the same losses and the same adapter
    assert sharded["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert sharded["losses"][-1] < 0.7 * sharded["losses"][0]
    assert sharded["adapter_checksum"] == pytest.approx(whole["adapter_checksum"], rel=1e-5)


def test_whole_copies_in_two_processes_hold_the_whole_model(tmp_path):
    """What DDP does, for comparison: every process holds all the weights."""
    copies = rehearse(tmp_path, 2, "--no-shard")
    assert not copies["sharded"] and copies["weight_bytes_by_process"][0] == copies["weight_bytes_in_model"]
