"""Will it fit? Trainable parameters and peak training memory, from a model's config.json alone.

Taught in notebook 03 (section "Will it fit?"); also ``python -m lora_helpers plan --preset NAME``.
The model is built on the meta device (shapes, no memory), so the parameter
count is exact; the memory is an estimate with a documented breakdown:

- quantized weights: the linear layers in NF4 (4.127 bits per weight with double quantization);
- unquantized parts: embeddings, output head and norms, never quantized. They load in 16-bit; for 4-bit
  training ``prepare_model_for_kbit_training`` (notebook 04) upcasts them to fp32, and the course casts the
  frozen embedding and head back (``training.embeddings_in_compute_dtype``): the norms keep 4 bytes each;
- LoRA: weights, gradients and AdamW's two moments, all fp32 (4 + 4 + 8 bytes per parameter);
- activations: what the backward pass keeps per token, per layer (16-bit); with gradient checkpointing
  only each layer's input is kept, and one layer's activations are rebuilt at a time. Counted as if every
  linear layer had an adapter: frozen layers without one keep less, so with fewer targets the estimate errs
  high (``python -m lora_helpers bench`` measures it: within 6% for all-linear, +6% for q,k,v,o with dropout).
  With ``lora_dropout`` > 0 every adapted layer also keeps a dropped-out copy of its input and the mask;
- logits: batch x length x vocabulary in fp32, and their gradient;
- overhead: on a GPU, the CUDA context and allocator slack (0.5 GB + 10%); a CPU has neither.

Taught in notebook 02 too (section "What 4-bit saves": ``weight_memory_gb``). ``notebook_memory`` extends the
plan to every notebook (loading, merging, saving, exporting, inference) and to host RAM, and ``check_notebook``
is what each notebook prints before it loads a model.
"""

from __future__ import annotations

from lora_helpers import device, lora, presets, shipped_configs

# NF4 with double quantization: a 4-bit code per weight, an 8-bit absmax per block of 64
# weights, and an fp32 scale per 256 of those absmaxes (QLoRA paper, section 3).
NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)
INT8_BITS_PER_WEIGHT = 8 + 32 / 4096  # LLM.int8(): 8-bit weights, a scale per row (~4096 wide)

STRATEGIES = ("ddp", "fsdp")
GPU_SIZES_GB = (15, 24, 40, 80)
GB = 2**30


def load_config(model_id: str):
    """The model's config: shipped for the presets' models, the tiny model's own, or read from the Hub/a folder."""
    from transformers import AutoConfig, LlamaConfig

    if model_id in shipped_configs.BY_MODEL_ID:
        return LlamaConfig(**shipped_configs.values(shipped_configs.BY_MODEL_ID[model_id]))
    from lora_helpers import models

    with models.load_errors_explained(model_id):
        return AutoConfig.from_pretrained(models.resolve_model_path(model_id))


def meta_model(config):
    """The model with every tensor on the meta device: real shapes, no memory, built in a second."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # Llama-3.2 shares its embedding with the output head; on meta it must be tied by hand
    return model


def config_sizes(config) -> dict:
    """Hidden size, MLP size, heads, key/value heads and head size under any architecture's names.

    Llama calls them ``hidden_size``, ``intermediate_size``, ``num_key_value_heads``; GPT-NeoX has no
    key/value heads (every head has its own), OPT calls the MLP ``ffn_dim``, GPT-2 ``n_embd`` and ``n_inner``.
    """
    first = lambda *names, default=None: next(  # noqa: E731
        (getattr(config, n) for n in names if getattr(config, n, None) is not None), default
    )
    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head")
    return {
        "hidden": hidden,
        "intermediate": first("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        "heads": heads,
        "kv_heads": first("num_key_value_heads", "multi_query_group_num", default=heads),
        "head_dim": first("head_dim", default=hidden // heads),
        "layers": first("num_hidden_layers", "n_layer"),
        "vocab": config.vocab_size,
    }


def embedding_parameter_count(config) -> int:
    """The input embedding and the output head (one matrix when they are tied)."""
    sizes = config_sizes(config)
    tied = getattr(config, "tie_word_embeddings", False)
    return sizes["vocab"] * sizes["hidden"] * (1 if tied else 2)


def activation_bytes_per_token_per_layer(config, compute_bytes: int = 2) -> int:
    """Tensors the backward pass keeps for one token in one decoder layer (norm outputs, q/k/v,
    attention output, residuals, the MLP's gate, up, activation and down input), in the compute dtype."""
    sizes = config_sizes(config)
    h, i = sizes["hidden"], sizes["intermediate"]
    kv = sizes["kv_heads"] * sizes["head_dim"]
    return compute_bytes * (6 * h + 2 * kv + 4 * i)


def quantizable_parameter_count(model) -> int:
    """Weights bitsandbytes stores in 4 or 8 bits: ``d_in * d_out`` of every linear layer (not the head)."""
    return sum(m.in_features * m.out_features for m in lora.linear_layers(model).values())


def weight_memory_gb(model, unquantized_bytes: int = 2) -> dict[str, float]:
    """Weight memory in GB (2**30 bytes) when the linear layers are stored at 16, 8 and 4 bits (notebook 02).

    Only the linear layers inside the blocks are quantized; what never is (embeddings, norms, head) is counted at
    ``unquantized_bytes`` in every bar alike: 2 in fp16/bf16 on a GPU, 4 in fp32 on a CPU.
    """
    quantizable = quantizable_parameter_count(model)
    rest_bytes = (lora.base_parameter_count(model) - quantizable) * unquantized_bytes
    return {
        "16-bit": (quantizable * 2 + rest_bytes) / GB,
        "8-bit": (quantizable * INT8_BITS_PER_WEIGHT / 8 + rest_bytes) / GB,
        "4-bit NF4": (quantizable * NF4_BITS_PER_WEIGHT / 8 + rest_bytes) / GB,
    }


def for_this_machine() -> dict:
    """``plan`` arguments for where it runs: fp16/bf16 and a CUDA overhead on a GPU, fp32 and none on a CPU."""
    import torch

    return {"compute_bytes": 2, "gpu": True} if torch.cuda.is_available() else {"compute_bytes": 4, "gpu": False}


def plan(settings, compute_bytes: int = 2, gpu: bool = True, num_gpus: int = 1, strategy: str = "ddp") -> dict:
    """Trainable parameters and the estimated peak training memory (bytes, by part) for these settings.

    ``compute_bytes`` is the size of the compute dtype: 2 on a GPU (fp16/bf16), 4 on a CPU (fp32); it sizes
    the activations, and the weights when they are not quantized. ``gpu`` adds the CUDA context and allocator
    slack; notebooks pass ``for_this_machine()``.

    On ``num_gpus`` GPUs the plan is per GPU. ``"ddp"`` (data parallel): every GPU holds the whole model and its
    own batch, plus DDP's gradient buckets (a copy of the trainable gradients). ``"fsdp"`` (fully sharded): the
    weights, the adapters' gradients and optimizer states are split across the GPUs; each GPU gathers one decoder
    layer's full weights at a time (two, with prefetching), and keeps its own batch's activations.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: use one of {', '.join(STRATEGIES)}.")
    if num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus}: must be 1 or more.")
    config = load_config(settings.model_id)
    model = meta_model(config)
    targets = lora.resolve_target_modules(model, settings.target_modules)
    trainable = lora.lora_parameter_count(model, settings.lora_r, targets)
    total = lora.base_parameter_count(model)
    quantizable = quantizable_parameter_count(model)
    tokens = settings.per_device_train_batch_size * settings.max_length
    per_layer = activation_bytes_per_token_per_layer(config, compute_bytes) * tokens
    sizes = config_sizes(config)
    layers = sizes["layers"]
    # LoRA dropout: each adapted layer keeps its own dropped-out copy of its input, and the mask (1 byte)
    adapted_inputs = sum(m.in_features for n, m in lora.linear_layers(model).items() if n.split(".")[-1] in targets)
    dropout = adapted_inputs * (compute_bytes + 1) * tokens if settings.lora_dropout > 0 else 0
    with_checkpointing = layers * tokens * sizes["hidden"] * compute_bytes + per_layer + dropout / layers
    without_checkpointing = layers * per_layer + dropout
    embeddings = embedding_parameter_count(config)
    norm_bytes = 4 if settings.load_in_4bit else compute_bytes  # fp32 after prepare_model_for_kbit_training
    parts = {
        "quantized weights": quantizable * (NF4_BITS_PER_WEIGHT / 8 if settings.load_in_4bit else compute_bytes),
        "unquantized parts": embeddings * compute_bytes + (total - quantizable - embeddings) * norm_bytes,
        "LoRA weights+grads+Adam": trainable * 16,
        "activations": with_checkpointing if settings.gradient_checkpointing else without_checkpointing,
        "logits": tokens * sizes["vocab"] * 4 * 2,
    }
    if num_gpus > 1 and strategy == "ddp":
        parts["DDP gradient buckets"] = trainable * 4
    if num_gpus > 1 and strategy == "fsdp":
        per_layer = parts["quantized weights"] / layers
        for name in ("quantized weights", "unquantized parts", "LoRA weights+grads+Adam"):
            parts[name] /= num_gpus
        # one decoder layer gathered whole, the next one prefetched, and the root unit (embedding and head)
        parts["FSDP gathered weights"] = 2 * per_layer + embeddings * compute_bytes
    if gpu:
        parts["overhead"] = 0.5 * GB + 0.1 * sum(parts.values())
    peak = sum(parts.values())
    return {
        "num_gpus": num_gpus,
        "strategy": strategy if num_gpus > 1 else "single",
        "effective_batch": settings.per_device_train_batch_size * settings.gradient_accumulation_steps * num_gpus,
        "model_id": settings.model_id,
        "parameters": total,
        "quantizable": quantizable,
        "trainable": trainable,
        "trainable_share_%": 100 * trainable / total,
        "targets": targets,
        "parts_gb": {k: v / GB for k, v in parts.items()},
        "activations_gb": {"with checkpointing": with_checkpointing / GB, "without": without_checkpointing / GB},
        "peak_gb": peak / GB,
        "fits_gb": {size: peak / GB <= size * 0.95 for size in GPU_SIZES_GB},
        "advice": advice(settings, peak / GB, parts),
    }


def advice(settings, peak_gb: float, parts: dict) -> list[str]:
    """What to change, largest saving first, when the plan does not fit a 15 GB T4."""
    if peak_gb <= 15 * 0.95:
        return []
    tips = []
    if not settings.gradient_checkpointing:
        tips.append("turn on gradient_checkpointing (activations shrink to about one layer's worth)")
    if not settings.load_in_4bit:
        tips.append("load_in_4bit=True (weights shrink about 3.5x)")
    if settings.per_device_train_batch_size > 1:
        tips.append(
            f"per_device_train_batch_size={settings.per_device_train_batch_size} -> 1, "
            "raising gradient_accumulation_steps to keep the effective batch"
        )
    tips.append(f"max_length={settings.max_length} -> {settings.max_length // 2} (activations and logits halve)")
    return tips


def format_plan(result: dict) -> str:
    from lora_helpers import plots

    unit, scale = plots.memory_unit(result["peak_gb"])
    lines = [
        f"{result['model_id']}: {result['parameters']:,} parameters, {result['trainable']:,} trainable "
        f"({result['trainable_share_%']:.3f}%) on {', '.join(result['targets'])}",
        "estimated peak training memory"
        + (
            f", per GPU of {result['num_gpus']} ({result['strategy'].upper()}, effective batch "
            f"{result['effective_batch']}):"
            if result.get("num_gpus", 1) > 1
            else ":"
        ),
    ]
    lines += [f"  {name:<24} {gb * scale:8.2f} {unit}" for name, gb in result["parts_gb"].items()]
    lines.append(f"  {'total':<24} {result['peak_gb'] * scale:8.2f} {unit}")
    lines.append("  fits: " + ", ".join(f"{gb} GB {'yes' if ok else 'no'}" for gb, ok in result["fits_gb"].items()))
    lines += [f"  to fit a 15 GB T4: {tip}" for tip in result["advice"]]
    if "notebooks" in result:
        lines.append("estimated peak per notebook (GPU memory, private host RAM; a Colab T4: 14.3 GB and 12.7 GB):")
        lines += [
            f"  {nb}  GPU {need['gpu_gb']:6.2f} GB  RAM {need['host_gb']:5.2f} GB  {need['holds']}"
            for nb, need in result["notebooks"].items()
        ]
    return "\n".join(lines)


def plan_for_preset(name: str, num_gpus: int = 1, strategy: str = "ddp", **overrides) -> dict:
    """``python -m lora_helpers plan``: the training plan of a preset on a GPU (per GPU on ``num_gpus``), and
    each notebook's peaks on one GPU."""
    settings = presets.resolve_settings(name, **overrides)
    result = plan(settings, num_gpus=int(num_gpus), strategy=strategy)
    one_gpu = result if int(num_gpus) == 1 else None  # the notebooks run on one GPU
    return {**result, "notebooks": notebook_memory(settings, training=one_gpu)}


# Host memory of a notebook's Python process before any model: torch, CUDA's libraries and the course's imports
# (2.9 GB measured on a CUDA machine, 0.4 GB on a CPU-only one).
HOST_BASE_GB = {True: 3.0, False: 0.5}
SHARD_GB = 2.0  # notebook 05 saves the merged model in 2 GB shards, each passing through host memory once
T4_GPU_GB = 14.3  # what PyTorch may use on a T4 (device.T4_TOTAL_BYTES less CUDA's context)
T4_HOST_RAM_GB = device.T4_HOST_RAM_GB

NOTEBOOK_STEPS = {
    "01": "no model",
    "02": "the 4-bit model, generation",
    "03": "the 4-bit model with adapters",
    "04": "training (the plan above)",
    "05": "the 4-bit model, then the base in 16-bit merged and saved, GGUF export",
    "06": "the 4-bit model with adapters, a second training, the merged 16-bit model",
}


def notebook_memory(settings, compute_bytes: int = 2, gpu: bool = True, training: dict | None = None) -> dict:
    """Estimated peak GPU memory and peak private host memory (GB) of each notebook, for these settings.

    GPU: notebook 02/03 hold the 4-bit model; 04 trains (``plan``); 05 holds one model at a time, the largest
    being the merged 16-bit model; 06 the largest of the 4-bit model, a second training and the merged model.
    Host: the process itself (``HOST_BASE_GB``), plus one 2 GB shard while notebook 05 saves. Weights are read
    from memory-mapped safetensors files: those pages count in the resident set but are dropped when memory is
    short, so they are not counted. On a CPU the GPU's share is host memory too. ``training``: this ``plan``
    (same settings, compute bytes and device), when the caller has it already.
    """
    training = training or plan(settings, compute_bytes, gpu)
    total, quantizable = training["parameters"], training["quantizable"]
    # Holding a model to run it (no training) costs its weights and a little more: CUDA context, generation's
    # cache and logits (measured on the Llama-2-7B shape: 16-bit 12.55 GB of weights, 12.79 GB reserved).
    overhead = (lambda gb: 0.3 + 1.02 * gb) if gpu else (lambda gb: gb)
    rest = (total - quantizable) * compute_bytes / GB
    four_bit = quantizable * NF4_BITS_PER_WEIGHT / 8 / GB + rest
    weights_4bit = four_bit if settings.load_in_4bit else total * compute_bytes / GB
    sixteen_bit = total * (2 if gpu else 4) / GB
    gpu_gb = {
        "01": 0.0,
        "02": overhead(weights_4bit),
        "03": overhead(weights_4bit),
        "04": training["peak_gb"],
        "05": overhead(max(weights_4bit, sixteen_bit)),
        "06": max(overhead(max(weights_4bit, sixteen_bit)), training["peak_gb"]),
    }
    base = HOST_BASE_GB[gpu]
    host_gb = {nb: base for nb in gpu_gb}
    host_gb["05"] = base + min(SHARD_GB, sixteen_bit)
    if not gpu:  # everything lives in host memory
        host_gb = {nb: host_gb[nb] + gpu_gb[nb] for nb in gpu_gb}
        gpu_gb = {nb: 0.0 for nb in gpu_gb}
    return {
        nb: {"gpu_gb": round(gpu_gb[nb], 2), "host_gb": round(host_gb[nb], 2), "holds": NOTEBOOK_STEPS[nb]}
        for nb in gpu_gb
    }


def check_notebook(settings, notebook: str) -> str:
    """What notebook ``notebook`` will need, against this machine and against a Colab T4; printed before loading.

    It says what to change when the estimate does not fit (it does not stop the notebook: the estimate can be
    off by a quarter either way; ``README.md``, "What a T4 needs", compares it with measurements).
    """
    import psutil
    import torch

    gpu = torch.cuda.is_available()
    need = notebook_memory(settings, 2 if gpu else 4, gpu)[notebook]
    ram_gb = psutil.virtual_memory().available / GB
    gpu_part = f"{need['gpu_gb']:.1f} GB of GPU memory and " if gpu else ""
    lines = [f"notebook {notebook} holds {need['holds']}: about {gpu_part}{need['host_gb']:.1f} GB of RAM"]
    if gpu:
        free_gb = device.gpu_memory_free_bytes() / GB
        lines.append(
            f"this GPU: {free_gb:.1f} GB free, {ram_gb:.1f} GB of RAM -> " + verdict(need, notebook, free_gb, ram_gb)
        )
    else:
        lines.append(f"this machine (CPU): {ram_gb:.1f} GB of RAM available -> " + verdict(need, notebook, 0.0, ram_gb))
    t4 = need if gpu else notebook_memory(settings, 2, True)[notebook]  # on a GPU: the same estimate
    lines.append(
        f"on a Colab T4 ({T4_GPU_GB} GB for PyTorch, {T4_HOST_RAM_GB} GB of RAM): "
        + verdict(t4, notebook, T4_GPU_GB, T4_HOST_RAM_GB)
    )
    return "\n".join(lines)


def verdict(need: dict, notebook: str, gpu_gb: float, ram_gb: float) -> str:
    """Fits or not, and what to change. Notebooks 05 and 06 load 16-bit models with ``device_map="auto"``, which
    puts what does not fit on the GPU in host RAM (slower, but it runs)."""
    spill = max(0.0, need["gpu_gb"] - gpu_gb) if gpu_gb else 0.0
    if spill and notebook not in ("05", "06"):
        return "probably does NOT fit: " + "; ".join(t4_advice(notebook))
    if need["host_gb"] + spill > ram_gb:
        return "probably does NOT fit in RAM: " + "; ".join(t4_advice(notebook))
    return f"fits, with {spill:.1f} GB placed in RAM by device_map='auto'" if spill else "fits"


def t4_advice(notebook: str) -> list[str]:
    """What to change when notebook ``notebook`` does not fit."""
    if notebook in ("04", "06"):
        return [
            "see the training plan's advice (python -m lora_helpers plan): gradient checkpointing, batch size 1, "
            "a shorter max_length"
        ]
    if notebook == "05":
        return ["merge on a machine with more RAM or GPU memory, or ship the adapter instead of a merged model"]
    return ["a smaller model: the 4-bit weights alone do not fit"]
