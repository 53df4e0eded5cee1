"""The machine: what it has, which compute dtype to use, whether 4-bit works, and the T4 rehearsal.

Taught in notebook 01 (sections "Your machine", "Which dtype?" and "Rehearsing a T4 on a bigger GPU").
"""

from __future__ import annotations

import json
import os
import platform
import sys

# A Colab T4: what torch reports as its memory (14.74 GiB; nvidia-smi shows 15360 MiB), and what is left to PyTorch's allocator once CUDA's own context
# (kernels, cuBLAS workspaces: about 0.4 GiB on a T4) is loaded. Colab's free tier adds 12.7 GB of host RAM.
T4_TOTAL_BYTES = 15_828_320_256
T4_CONTEXT_BYTES = 400 * 2**20
T4_HOST_RAM_GB = 12.7
REHEARSAL_ENV = "LORA_COURSE_REHEARSE_T4"
PEAKS_ENV = "LORA_COURSE_PEAKS_FILE"


def rehearsing_t4() -> bool:
    """True after ``rehearse_t4()`` in this process, or when the course runner started it with ``--rehearse-t4``."""
    return os.environ.get(REHEARSAL_ENV) == "1"


def rehearse_t4() -> str:
    """Make a bigger GPU behave like a Colab T4 for the rest of this process; returns what was set.

    An instructor with an A100 or H100 checks a class before teaching it: PyTorch's allocator is capped at what
    a T4 leaves it (``torch.cuda.set_per_process_memory_fraction``), so a step that needs more than a T4 fails
    here with the same out-of-memory error; compute runs in fp16 (a T4 has no bf16) and attention in SDPA (no
    FlashAttention-2). Host RAM cannot be capped this way: the runner records each notebook's peak and compares it
    with Colab's 12.7 GB. Call it before any model is loaded. Taught in notebook 01.
    """
    import torch

    os.environ[REHEARSAL_ENV] = "1"  # compute_dtype() and attention_implementation() read it, here and in children
    if not torch.cuda.is_available():
        return "T4 rehearsal: no CUDA GPU here, so only the T4's settings apply (fp16 is used on GPUs only)"
    index = torch.cuda.current_device()  # GPU 0, or this process's own GPU under torchrun (launch.train)
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, (T4_TOTAL_BYTES - T4_CONTEXT_BYTES) / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return (
        f"T4 rehearsal on {torch.cuda.get_device_name()}: PyTorch may use {fraction * total / 2**30:.2f} GiB of "
        f"{total / 2**30:.0f} GiB, fp16 compute, SDPA attention"
    )


def gpu_memory_free_bytes() -> int:
    """Free GPU memory as this process may use it: under the T4 rehearsal, what is left below the cap."""
    import torch

    free, total = torch.cuda.mem_get_info()
    if rehearsing_t4():
        cap = min(total, T4_TOTAL_BYTES - T4_CONTEXT_BYTES)
        free = min(free, cap - torch.cuda.memory_reserved())
    return free


_private_peak_bytes = [0]


def _sample_private_memory(interval_s: float = 0.2) -> None:
    """Track the peak of this process's anonymous resident memory (``RssAnon``), every ``interval_s``."""
    import time

    while True:
        try:
            status = open("/proc/self/status").read()
        except OSError:  # not Linux: only the overall peak is recorded
            return
        for line in status.splitlines():
            if line.startswith("RssAnon:"):
                _private_peak_bytes[0] = max(_private_peak_bytes[0], int(line.split()[1]) * 1024)
        time.sleep(interval_s)


def start_recording_peaks(path: str) -> None:
    """Record this process's peak memory into ``path`` when it exits (``record_peaks``). The course runner sets
    ``LORA_COURSE_PEAKS_FILE`` for each notebook's kernel, and ``lora_helpers/__init__.py`` calls this."""
    import atexit
    import threading

    threading.Thread(target=_sample_private_memory, daemon=True, name="lora-course-peaks").start()
    atexit.register(record_peaks, path)


def record_peaks(path: str) -> None:
    """Write this process's peak GPU memory (PyTorch's max reserved and allocated) and host memory to ``path``.

    Host memory comes twice: the peak resident set (``ru_maxrss``), which also counts the pages of memory-mapped
    model files that were read (the kernel drops those when it needs the room), and the peak of private memory
    (``RssAnon``, sampled every 0.2 s), which cannot be dropped: that is what must fit Colab's 12.7 GB.
    """
    import resource

    peaks = {"host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if _private_peak_bytes[0]:
        peaks["host_peak_private_gb"] = round(_private_peak_bytes[0] / 2**30, 2)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["gpu_max_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        peaks["gpu_max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    with open(path, "w") as handle:
        json.dump(peaks, handle)


def compute_dtype():
    """bf16 on Ampere or newer (compute capability >= 8.0), fp16 on older GPUs (a T4 is 7.5), fp32 on CPU.

    A T4 has no bf16 tensor cores: bf16 matmuls run roughly 17x slower than fp16 there.
    CPUs compute fp16 slowly and bf16 unevenly, so the CPU path stays in fp32. Under the T4 rehearsal: fp16.
    """
    import torch

    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return torch.bfloat16 if major >= 8 and not rehearsing_t4() else torch.float16
    return torch.float32


def attention_implementation() -> str:
    """FlashAttention-2 where it runs (Ampere or newer, with the ``flash-attn`` package), else PyTorch's SDPA.

    A T4 (compute capability 7.5) cannot run FlashAttention-2; there SDPA picks its memory-efficient kernel,
    which also never holds the full attention matrix. Taught in notebook 02 ("Which attention?").
    """
    import importlib.util

    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 and not rehearsing_t4():
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
        report["gpu_memory_free_gb"] = round(gpu_memory_free_bytes() / 2**30, 2)
        report["gpu_memory_total_gb"] = round(total / 2**30, 2)
        if rehearsing_t4():
            report["t4_rehearsal"] = f"capped at {(T4_TOTAL_BYTES - T4_CONTEXT_BYTES) / 2**30:.2f} GiB, fp16, SDPA"
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
