"""FSDP on a 4-bit model, small enough to watch on CPUs: the rehearsal of FSDP-QLoRA in notebook 07.

DDP keeps a whole copy of the model in every process. FSDP (fully sharded data parallel) keeps 1/N of every
weight, gradient and optimizer state in each of N processes, and gathers a block's weights only while that block
computes, so a model that no single GPU can hold still trains. PyTorch's FSDP2 (``fully_shard``) works per
module: each decoder layer is one unit, and the root unit holds the rest (embeddings, final norm, head).

bitsandbytes packs two 4-bit weights into each byte; FSDP shards floating-point tensors only, so the packed
weights are stored in a float dtype (``bnb_4bit_quant_storage``, ``models.fsdp_storage_dtype``) and FSDP moves
them without looking inside. Run it under torchrun; rank 0 writes the result as JSON::

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m lora_helpers.sharding --out fsdp.json

On GPUs the course trains with FSDP through the trainer (``accelerate launch --config_file
lora_helpers/configs/accelerate/fsdp_qlora.yaml -m lora_helpers train ...``); this module shows on CPUs what
that does, with PyTorch's own ``fully_shard`` (accelerate's FSDP on CPUs silently becomes plain DDP).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def shard_model(model) -> int:
    """``fully_shard`` every decoder layer, then the whole model (the root unit); returns the number of units.

    The layer class is the one the model names in ``_no_split_modules``, as accelerate's
    ``TRANSFORMER_BASED_WRAP`` policy finds it.
    """
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer class in _no_split_modules: nothing to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return len(layers) + 1


def local_weight_bytes(model) -> int:
    """Bytes of weights this process holds: its shards under FSDP, every weight otherwise."""
    total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter  # a DTensor under FSDP2
        total += local.numel() * local.element_size()
    return total


def one_batch(settings, tokenizer, size: int = 8) -> dict:
    """The first ``size`` training examples as the chat template's ids, padded, with the loss on the answers."""
    import torch

    from lora_helpers import data

    raw = data.load_examples(settings.dataset)
    shape = data.check_examples(raw, settings.dataset)
    rows = []
    for example in raw.select(range(min(size, len(raw)))):
        prompt, completion = data.token_ids(
            data.to_prompt_completion(example, shape, settings.system_prompt), tokenizer
        )
        ids = (prompt + completion)[: settings.max_length]
        rows.append((ids, ([-100] * len(prompt) + completion)[: settings.max_length]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


def rehearse(preset: str = "tiny", steps: int = 8, shard: bool = True) -> dict:
    """Train the preset's 4-bit LoRA model for ``steps`` steps on one batch, sharded with FSDP2 when there are
    several processes and ``shard``. Every process sees the same batch, so the averaged gradient, the losses and
    the trained adapter equal one process's, while each process holds 1/N of the weights."""
    import torch

    from lora_helpers import models, presets, process, training

    settings = presets.resolve_settings(preset)
    _, world_size = process.world()
    torch.manual_seed(settings.seed)  # the same LoRA initialisation in every process
    tokenizer = models.load_tokenizer(settings.model_id, settings.trust_remote_code, settings.chat_format)
    storage = models.fsdp_storage_dtype()
    model = training.lora_model(settings, tokenizer=tokenizer, quant_storage=storage)
    total_bytes = local_weight_bytes(model)
    units = shard_model(model) if shard and world_size > 1 else 0
    device = next(model.parameters()).device
    batch = {name: tensor.to(device) for name, tensor in one_batch(settings, tokenizer).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in trainable]  # gathers the shards
    result = {
        "world_size": world_size,
        "sharded": bool(units),
        "fsdp_units": units,
        "storage_dtype": str(storage).removeprefix("torch."),
        "weight_bytes_per_process": local_weight_bytes(model),
        "weight_bytes_in_model": total_bytes,
        "losses": losses,
        "adapter_checksum": process.adapter_checksum(full),
    }
    result["weight_bytes_by_process"] = process.from_every_process(result["weight_bytes_per_process"])
    return result


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist
    import transformers

    import lora_helpers  # noqa: F401 (its log filters)
    from lora_helpers import process

    transformers.utils.logging.disable_progress_bar()  # N processes drawing bars on one terminal

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-shard", action="store_true", help="keep a whole copy in every process (as DDP does)")
    parser.add_argument("--out", required=True, help="where rank 0 writes the result (JSON)")
    args = parser.parse_args(argv)
    rank, world_size = process.world()
    if world_size > 1:
        process.use_own_gpu()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        result = rehearse(args.preset, args.steps, shard=not args.no_shard)
    finally:
        if dist.is_initialized():
            dist.barrier()  # every process done with FSDP's collectives before the group goes
            dist.destroy_process_group()
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(
            f"{world_size} process(es), {'sharded' if result['sharded'] else 'whole copies'}: "
            f"{result['weight_bytes_per_process'] / 2**20:.2f} MiB of weights each; "
            f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
