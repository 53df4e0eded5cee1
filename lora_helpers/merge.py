"""Merging a QLoRA adapter: into an unquantized reload, or into the dequantized NF4 weights it was trained on.

Taught in notebook 05. Two ways, both checked against base + adapter:
(a) reload the base unquantized and merge (the Llama-2 Guanaco Colab recipe): simple, but the adapter was trained against the
    NF4-rounded weights, not these; (b) dequantize the NF4 weights and merge there: the merged model computes
    what was trained. Merging into weights still stored in 4 bits is refused: see ``refuse_4bit_merge``.
"""

from __future__ import annotations

from lora_helpers import lora, models

MERGE_MODES = ("unquantized", "dequantized")


def refuse_4bit_merge(model) -> None:
    """Fail with an explanation when the model's linear layers are still stored in 4 bits."""
    quantized = [name for name, m in lora.linear_layers(model).items() if type(m).__name__ == "Linear4bit"]
    if quantized:
        raise ValueError(
            f"The model still stores {len(quantized)} linear layers in 4 bits (e.g. {quantized[0]}). Merging "
            "there would round W + (alpha/r)·B·A back to the 16 NF4 levels of each block, and those steps are "
            "larger than most of the update: the adapter would mostly vanish (notebook 05 measures it). "
            "Merge instead into (a) the base reloaded unquantized: merge_mode='unquantized', or (b) the "
            "dequantized NF4 weights the adapter was trained against: merge_mode='dequantized'."
        )


def load_base_for_merge(settings, merge_mode: str, dtype, tokenizer, device_map=None):
    """The base model to merge into: reloaded unquantized (a), or loaded in NF4 and dequantized (b).

    Its embeddings grow to the adapter's ``tokenizer`` when training added a pad token (``models.match_vocabulary``).
    """
    if merge_mode not in MERGE_MODES:
        raise ValueError(f"merge_mode={merge_mode!r}: use one of {MERGE_MODES}.")
    if merge_mode == "unquantized":
        base = models.load_model(
            settings.model_id,
            load_in_4bit=False,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=settings.trust_remote_code,
        )
    else:
        quantized = models.load_model(
            settings.model_id, load_in_4bit=True, dtype=dtype, trust_remote_code=settings.trust_remote_code
        )
        base = quantized.dequantize()  # every Linear4bit becomes nn.Linear holding its NF4 values in `dtype`
    models.match_vocabulary(base, tokenizer)
    return base
