"""LoRA targets and parameter counts, found from the model itself.

Taught in notebook 03. A LoRA adapter on a linear layer ``W`` (``d_out x d_in``)
adds ``B`` (``d_out x r``) and ``A`` (``r x d_in``), so it trains exactly
``r * (d_in + d_out)`` parameters per adapted layer.
"""

from __future__ import annotations

# Layers LoRA should never adapt by default: the output head (vocabulary-sized, and tied
# to the embeddings in many models).
EXCLUDED = ("lm_head", "embed_out", "output_layer")


def linear_layers(model) -> dict[str, object]:
    """Every linear layer of the model by its full name: ``nn.Linear`` and bitsandbytes' 4/8-bit kinds."""
    import torch

    found = {}
    for name, module in model.named_modules():
        if not name or name.split(".")[-1] in EXCLUDED:
            continue
        # bitsandbytes' 4/8-bit layers, and peft's wrappers of a linear layer (``lora.Linear`` over an unquantized
        # one is no nn.Linear subclass, but it has the layer's in/out features).
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        is_linear = is_linear or isinstance(getattr(module, "base_layer", None), torch.nn.Linear)
        # A peft-wrapped layer holds its original as `.base_layer`: count the wrapper, not the inner one.
        if is_linear and not name.endswith(".base_layer") and ".lora_" not in name:
            found[name] = module
    return found


def linear_layer_names(model) -> list[str]:
    """The distinct short names of the linear layers (``q_proj``, ``up_proj``, ...), in model order."""
    names = []
    for full_name in linear_layers(model):
        short = full_name.split(".")[-1]
        if short not in names:
            names.append(short)
    return names


def resolve_target_modules(model, target_modules: str | list[str]) -> list[str]:
    """Turn ``"all-linear"`` or ``"q_proj,v_proj"`` into a checked list of layer names for ``LoraConfig``."""
    available = linear_layer_names(model)
    if isinstance(target_modules, str):
        if target_modules.strip() == "all-linear":
            return available
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    missing = [t for t in target_modules if t not in available]
    if missing:
        raise ValueError(
            f"target_modules {missing} match no linear layer of this model. Its linear layers are: "
            f"{', '.join(available)} (or use 'all-linear')."
        )
    return list(target_modules)


def lora_parameter_count(model, r: int, target_modules: list[str]) -> int:
    """Closed form: sum of ``r * (d_in + d_out)`` over the layers whose short name is targeted."""
    total = 0
    for full_name, module in linear_layers(model).items():
        if full_name.split(".")[-1] in target_modules:
            total += r * (module.in_features + module.out_features)
    return total


def base_parameter_count(model) -> int:
    """Parameters of the base model, counting each 4-bit weight as its unpacked number of values.

    A peft-wrapped model's adapters (``lora_A``, ``lora_B``) are not the base and are left out, so the count is
    the same before and after ``get_peft_model`` (peft's ``print_trainable_parameters`` divides by all
    parameters, adapters included, which is why its percentage is lower).
    """
    total = 0
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            continue
        shape = getattr(parameter, "quant_state", None)
        total += shape.shape.numel() if shape is not None else parameter.numel()
    return total


def trainable_parameter_table(model, ranks: list[int], target_choices: dict[str, list[str]]) -> list[dict]:
    """Rows of (targets, rank, trainable parameters, share of the base model) for notebook 03's table."""
    base = base_parameter_count(model)
    rows = []
    for label, targets in target_choices.items():
        for r in ranks:
            count = lora_parameter_count(model, r, targets)
            rows.append({"targets": label, "r": r, "trainable": count, "share_%": round(100 * count / base, 4)})
    return rows


def standard_target_choices(model) -> dict[str, list[str]]:
    """The three usual choices of the source recipes, as far as this model has the layers."""
    names = linear_layer_names(model)
    choices = {}
    if {"q_proj", "v_proj"} <= set(names):
        choices["q,v (Llama-2 recipes)"] = ["q_proj", "v_proj"]
    attention = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if n in names]
    if len(attention) == 4:
        choices["attention q,k,v,o (Llama-3.1 guide)"] = attention
    choices["all linear (Llama-3.2 guide)"] = names
    return choices


def loftq_initialise(peft_model, adapter_name: str = "default") -> dict:
    """LoftQ on a 4-bit base (notebook 08): each adapter starts as the best rank-r fit of what 4-bit rounding took
    from its layer, ``W - dequantize(NF4(W))``, so base + adapter starts closer to the full-precision model than
    the 4-bit base alone. Returns the rounding error (Frobenius norm over the adapted layers) before and after.

    The steps of peft's ``replace_lora_weights_loftq`` (the full-precision weights read from the model's own
    safetensors files), with two differences: it runs on any device (peft's computes on CUDA only), and it fits
    ``scaling * B @ A`` rather than ``B @ A``. peft's fit is exact only when ``lora_alpha == r``; with the course's
    ``lora_alpha = 2 * r`` the layer doubles the fitted part, and since ``F``, the best rank-r fit of the error
    ``E``, is orthogonal to ``E - F``, ``|E - 2F| = |E|``: the model starts exactly as far from full precision as
    without LoftQ.
    """
    import os

    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _SafetensorLoader

    source = peft_model.get_base_model().config.name_or_path
    weights = _SafetensorLoader(peft_model, source if os.path.isdir(source) else None)
    before = after = 0.0
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit) or adapter_name not in module.lora_A:
            continue
        with torch.no_grad():
            device = module.lora_A[adapter_name].weight.device
            full = weights.get_tensor(name.removeprefix("base_model.model.") + ".weight").to(device, torch.float32)
            rounded = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            lost = full - rounded
            u, s, vh = torch.linalg.svd(lost / module.scaling[adapter_name], full_matrices=False)
            r = module.r[adapter_name]
            root = s[:r].sqrt()
            lora_b, lora_a = u[:, :r] * root, root[:, None] * vh[:r]  # B @ A: the rank-r fit, split evenly
            module.lora_A[adapter_name].weight.copy_(lora_a)
            module.lora_B[adapter_name].weight.copy_(lora_b)
            before += lost.norm().item() ** 2
            after += (lost - module.scaling[adapter_name] * lora_b @ lora_a).norm().item() ** 2
    if not before:
        raise ValueError(
            "LoftQ found no LoRA layer on a 4-bit (bitsandbytes Linear4bit) weight: it fits the adapter to the "
            "4-bit rounding error, so load the base with load_in_4bit=True."
        )
    return {"rounding_error_before": before**0.5, "rounding_error_after": after**0.5}
