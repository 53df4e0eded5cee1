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
