import pytest

from lora_helpers import models


def test_tiny_loads_in_4bit(tiny_model_4bit):
    q_proj = tiny_model_4bit.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert tiny_model_4bit.is_loaded_in_4bit


def test_tiny_loads_unquantized_in_fp32(tiny_dir):
    import torch

    model = models.load_model("tiny", load_in_4bit=False)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_tokenizer_gets_a_pad_token_that_is_not_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_unreachable_hub_id_says_how_to_work_offline():
    with pytest.raises(OSError, match="local model directory"):
        models.load_tokenizer("NousResearch/Llama-2-7b-chat-hf")


def test_gated_model_error_says_where_the_token_goes():
    error = models.explain_load_error("meta-llama/Llama-3.1-8B", OSError("401 Client Error: gated repo"))
    assert isinstance(error, PermissionError) and "HF_TOKEN" in str(error)
