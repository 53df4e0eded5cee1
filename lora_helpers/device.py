"""The machine: what it has, which compute dtype to use, whether 4-bit works.

Taught in notebook 01 (sections "Your machine" and "Which dtype?").
"""

from __future__ import annotations

import platform


def compute_dtype():
    """bf16 on Ampere or newer (compute capability >= 8.0), fp16 on older GPUs (a T4 is 7.5), fp32 on CPU.

    A T4 has no bf16 tensor cores: bf16 matmuls run roughly 17x slower than fp16 there.
    CPUs compute fp16 slowly and bf16 unevenly, so the CPU path stays in fp32.
    """
    import torch

    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def attention_implementation() -> str:
    """FlashAttention-2 where it runs (Ampere or newer, with the ``flash-attn`` package), else PyTorch's SDPA.

    A T4 (compute capability 7.5) cannot run FlashAttention-2; there SDPA picks its memory-efficient kernel,
    which also never holds the full attention matrix. Taught in notebook 02 ("Which attention?").
    """
    import importlib.util

    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def environment_report() -> dict:
    """Versions of the course's libraries and a description of the accelerator (or CPU)."""
    import importlib.metadata as md

    import torch

    report = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            report[package] = md.version(package)
        except md.PackageNotFoundError:
            report[package] = "not installed"
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        major, minor = torch.cuda.get_device_capability()
        report["device"] = torch.cuda.get_device_name()
        report["compute_capability"] = f"{major}.{minor}"
        report["gpu_memory_free_gb"] = round(free / 2**30, 2)
        report["gpu_memory_total_gb"] = round(total / 2**30, 2)
    else:
        report["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report["compute_dtype"] = str(compute_dtype()).removeprefix("torch.")
    report["attention"] = attention_implementation()
    return report


def check_4bit() -> tuple[bool, str]:
    """Quantize and dequantize a small tensor with bitsandbytes NF4 on this device.

    Returns (works, message). bitsandbytes >= 0.47 runs NF4 on CPU too, which is
    how the tiny preset exercises real QLoRA without a GPU.
    """
    import torch

    try:
        import bitsandbytes.functional as bnbf
    except Exception as error:  # ImportError, or a CUDA setup error raised at import
        return False, f"bitsandbytes cannot be imported ({error}). Install it: pip install 'bitsandbytes>=0.47'."
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        weights = torch.randn(64, 64, device=device)
        packed, state = bnbf.quantize_4bit(weights, quant_type="nf4")
        restored = bnbf.dequantize_4bit(packed, state)
        error = (restored - weights).abs().mean().item()
    except Exception as error:
        return False, (
            f"bitsandbytes 4-bit does not run on {device} here ({type(error).__name__}: {error}). "
            "Set load_in_4bit=False to train plain LoRA in 16/32-bit, or use a GPU runtime."
        )
    return True, f"NF4 round trip on {device}: mean |error| = {error:.4f} (4-bit levels, so small but not zero)"
