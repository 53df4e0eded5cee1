"""Facts about this process when a launcher started several (taught in notebook 07).

torchrun and ``accelerate launch`` start one process per GPU and tell each which it is through environment
variables: ``RANK`` (its place among all of them), ``WORLD_SIZE`` (how many) and ``LOCAL_RANK`` (its GPU on this
machine); ``accelerate launch`` with an FSDP configuration also sets ``ACCELERATE_USE_FSDP``. A plain process (a
notebook) is rank 0 of 1. The modules that load, train and shard models read these facts from here.
"""

from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, number of processes), as torchrun and accelerate launch set them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``), which is the GPU it uses; 0 for a plain process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def fsdp_launched() -> bool:
    """Whether ``accelerate launch`` started this process with an FSDP configuration (it sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


EXECUTED_PAGE = "LORA_COURSE_EXECUTED_PAGE"  # set by the course runner for the notebooks it executes


def on_executed_page() -> bool:
    """Whether the course runner executes this notebook, saving its outputs as a page to read (no live bars)."""
    return os.environ.get(EXECUTED_PAGE) == "1"


def use_own_gpu() -> None:
    """Make this process's GPU the current CUDA device, before anything uses one (nothing to do without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def from_every_process(value) -> list:
    """``value`` as every process has it, in rank order (all processes must call this); ``[value]`` alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def adapter_checksum(weights) -> float:
    """The sum of |w| over ``weights`` (the LoRA ones): equal numbers mean equal adapters, for all practical ends."""
    return float(sum(w.detach().double().abs().sum() for w in weights))


def replica_checksums(model) -> list[float]:
    """Every process's ``adapter_checksum`` of its trainable (LoRA) weights: equal when the copies agree."""
    return from_every_process(adapter_checksum(p for p in model.parameters() if p.requires_grad))
