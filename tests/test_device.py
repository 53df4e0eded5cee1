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
