"""How much memory a model's weights take at 16, 8 and 4 bits.

Taught in notebook 02 (section "What 4-bit saves"). bitsandbytes quantizes the
linear layers inside the transformer blocks; embeddings, norms and the output
head stay in 16-bit, which is why a "4-bit" model is a little more than a
quarter of its 16-bit size.
"""

from __future__ import annotations

from lora_helpers import lora

# NF4 with double quantization: a 4-bit code per weight, an 8-bit absmax per block of 64
# weights, and an fp32 scale per 256 of those absmaxes (QLoRA paper, section 3).
NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)
INT8_BITS_PER_WEIGHT = 8 + 32 / 4096  # LLM.int8(): 8-bit weights, a scale per row (~4096 wide)


def quantizable_parameter_count(model) -> int:
    """Weights bitsandbytes stores in 4 or 8 bits: ``d_in * d_out`` of every linear layer (not the head)."""
    return sum(m.in_features * m.out_features for m in lora.linear_layers(model).values())


def weight_memory_gb(model, unquantized_bytes: int = 2) -> dict[str, float]:
    """Estimated weight memory in GB (2**30 bytes) when the linear layers are stored at 16, 8 and 4 bits.

    ``unquantized_bytes`` is the storage of what is never quantized: 2 in fp16/bf16 (GPU), 4 in fp32 (CPU).
    """
    quantizable = quantizable_parameter_count(model)
    total = lora.base_parameter_count(model)
    rest_bytes = (total - quantizable) * unquantized_bytes  # embeddings, norms, head: never quantized
    gb = 2**30
    return {
        "16-bit": total * 2 / gb,
        "8-bit": (quantizable * INT8_BITS_PER_WEIGHT / 8 + rest_bytes) / gb,
        "4-bit NF4": (quantizable * NF4_BITS_PER_WEIGHT / 8 + rest_bytes) / gb,
    }
