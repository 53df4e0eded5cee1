import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_helpers import lora

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_linear_layers_are_found_in_a_4bit_model(tiny_model_4bit):
    assert lora.linear_layer_names(tiny_model_4bit) == LLAMA
    kinds = {type(m).__name__ for m in lora.linear_layers(tiny_model_4bit).values()}
    assert kinds == {"Linear4bit"}
    assert "lm_head" not in lora.linear_layer_names(tiny_model_4bit)


def test_resolve_targets(tiny_model_4bit):
    assert lora.resolve_target_modules(tiny_model_4bit, "all-linear") == LLAMA
    assert lora.resolve_target_modules(tiny_model_4bit, "q_proj, v_proj") == ["q_proj", "v_proj"]


def test_a_typo_in_targets_lists_the_real_names(tiny_model_4bit):
    with pytest.raises(ValueError, match="q_prj.*q_proj, k_proj"):
        lora.resolve_target_modules(tiny_model_4bit, "q_prj,v_proj")


@pytest.mark.parametrize(
    "r, targets", [(8, ["q_proj", "v_proj"]), (4, LLAMA), (16, ["q_proj", "k_proj", "v_proj", "o_proj"])]
)
def test_closed_form_equals_peft_count(tiny_model_4bit, r, targets):
    expected = lora.lora_parameter_count(tiny_model_4bit, r, targets)
    model = get_peft_model(
        tiny_model_4bit, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM")
    )
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert lora.lora_parameter_count(model, r, targets) == expected  # also on the wrapped model


def test_base_count_unpacks_4bit_weights(tiny_dir, tiny_model_4bit):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert lora.base_parameter_count(tiny_model_4bit) == sum(p.numel() for p in full.parameters())


def test_llama2_7b_closed_form_on_the_meta_device():
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig())  # the defaults are Llama-2-7B's shapes
    assert lora.lora_parameter_count(model, 8, ["q_proj", "v_proj"]) == 4_194_304
    assert lora.lora_parameter_count(model, 16, LLAMA) == 16 * 32 * (4 * 8192 + 3 * (4096 + 11008))


def test_standard_choices(tiny_model_4bit):
    choices = lora.standard_target_choices(tiny_model_4bit)
    assert list(choices.values()) == [["q_proj", "v_proj"], LLAMA[:4], LLAMA]


def test_lora_update_starts_at_zero(tiny_model_4bit):
    probe = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        before = tiny_model_4bit(probe).logits
        model = get_peft_model(tiny_model_4bit, LoraConfig(r=8, target_modules=LLAMA, task_type="CAUSAL_LM"))
        after = model(probe).logits
    assert torch.equal(before, after)
