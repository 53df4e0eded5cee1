import pytest
import torch

from lora_helpers import device


def test_cpu_computes_in_fp32():
    assert not torch.cuda.is_available()
    assert device.compute_dtype() == torch.float32


def test_environment_report_names_versions_and_device():
    report = device.environment_report()
    for key in ("python", "torch", "transformers", "peft", "trl", "bitsandbytes", "device", "compute_dtype"):
        assert report[key]
    assert report["device"].startswith("CPU")


def test_4bit_runs_here():
    works, message = device.check_4bit()
    assert works, message
    assert "mean |error|" in message


def test_seeding_repeats():
    device.seed_everything(3)
    a = torch.rand(3)
    device.seed_everything(3)
    assert torch.equal(a, torch.rand(3))


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
