import pytest

from lora_helpers import memory


def test_llama2_7b_weight_memory():
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig())
    sizes = memory.weight_memory_gb(model)
    assert sizes["16-bit"] == pytest.approx(6_738_415_616 * 2 / 2**30)
    assert 3.4 < sizes["4-bit NF4"] < 3.8  # what the QLoRA paper's 7B row reports, about 3.6 GB
    assert sizes["4-bit NF4"] < sizes["8-bit"] < sizes["16-bit"]


def test_estimate_is_close_to_the_measured_4bit_footprint(tiny_model_4bit):
    estimate = memory.weight_memory_gb(tiny_model_4bit, unquantized_bytes=4)["4-bit NF4"] * 2**30  # fp32 on CPU
    measured = tiny_model_4bit.get_memory_footprint()
    assert estimate == pytest.approx(measured, rel=0.15)
