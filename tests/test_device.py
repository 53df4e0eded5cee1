import pytest
import torch

from lora_helpers import device


def test_cpu_computes_in_fp32():
    import os

    assert not torch.cuda.is_available() and os.environ["CUDA_VISIBLE_DEVICES"] == ""  # hidden by conftest
    assert device.compute_dtype() == torch.float32


def test_environment_report_names_versions_and_device():
    report = device.environment_report()
    import importlib.metadata as md

    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        assert report[package] == md.version(package)  # a real version, not "not installed"
    assert report["python"].count(".") == 2 and report["compute_dtype"] == "float32"
    assert report["device"].startswith("CPU")


def test_4bit_runs_here():
    works, message = device.check_4bit()
    assert works, message
    assert "mean |error|" in message


@pytest.mark.parametrize(
    "cuda, capability, flash_attn, expected",
    [
        (False, None, True, "sdpa"),  # CPU
        (True, (7, 5), True, "sdpa"),  # T4: no FlashAttention-2, even if the package is installed
        (True, (8, 0), False, "sdpa"),  # A100 without flash-attn
        (True, (8, 0), True, "flash_attention_2"),  # A100 with flash-attn
    ],
)
def test_attention_implementation_by_device(monkeypatch, cuda, capability, flash_attn, expected):
    import importlib.util

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" and flash_attn else real_find_spec(name, *a),
    )
    assert device.attention_implementation() == expected


def test_models_load_with_the_chosen_attention(tiny_dir):
    from lora_helpers import models

    assert models.load_model("tiny", load_in_4bit=True).config._attn_implementation == "sdpa"


def test_t4_rehearsal_caps_memory_and_forces_fp16_and_sdpa(monkeypatch):
    """On a bigger GPU (faked: CI has none), rehearse_t4 caps PyTorch at a T4's memory, and the course computes in
    fp16 with SDPA attention as it would on a T4."""
    import importlib.util

    fraction = []
    monkeypatch.setenv(device.REHEARSAL_ENV, "0")  # restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, index=None: fraction.append(f))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (75 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 4 * 2**30)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real_find_spec(n))
    assert device.compute_dtype() == torch.bfloat16 and device.attention_implementation() == "flash_attention_2"
    assert device.gpu_memory_free_bytes() == 75 * 2**30

    message = device.rehearse_t4()
    cap = device.T4_TOTAL_BYTES - device.T4_CONTEXT_BYTES
    assert device.rehearsing_t4() and "14.35 GiB of 80 GiB" in message
    assert fraction == [pytest.approx(cap / (80 * 2**30))]
    assert device.compute_dtype() == torch.float16 and device.attention_implementation() == "sdpa"
    assert device.gpu_memory_free_bytes() == cap - 4 * 2**30  # what is left under the cap, not the card's 75 GB


def test_peaks_are_recorded_for_the_runner(tmp_path):
    import json
    import threading

    threading.Thread(target=device._sample_private_memory, daemon=True).start()
    ballast = bytearray(300 * 2**20)  # 300 MB of private memory
    import time

    time.sleep(0.6)
    del ballast
    device.record_peaks(str(tmp_path / "peaks.json"))
    peaks = json.loads((tmp_path / "peaks.json").read_text())
    assert peaks["host_peak_private_gb"] >= 0.29 and peaks["host_peak_rss_gb"] >= peaks["host_peak_private_gb"]
    assert "gpu_max_reserved_gb" not in peaks  # no GPU here
