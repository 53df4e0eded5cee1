"""model_id may name any causal LM: targets are read from the model, so other architectures train too."""

import math

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lora_helpers import lora, models, presets, training

SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES = {
    "gpt_neox": (dict(intermediate_size=256), ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "opt": (dict(ffn_dim=256, word_embed_proj_dim=128), ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"]),
    "qwen2": (dict(intermediate_size=256, num_key_value_heads=2), None),
    "mistral": (dict(intermediate_size=256, num_key_value_heads=2), None),
    "phi3": (
        dict(intermediate_size=256, num_key_value_heads=4, pad_token_id=3),
        ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
    ),
}
LLAMA_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_other_architectures_load_in_4bit_and_train(arch, tiny_dir, tmp_path):
    extra, names = ARCHITECTURES[arch]
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SMALL,
        **extra,
    )
    model_dir = tmp_path / arch
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    model = models.load_model(str(model_dir), load_in_4bit=True)
    assert lora.resolve_target_modules(model, "all-linear") == (names or LLAMA_NAMES)
    settings = presets.resolve_settings(
        "tiny",
        model_id=str(model_dir),
        dataset="package:persona_captain.jsonl",
        num_train_epochs=2,
        eval_fraction=0.0,
        logging_steps=1,
    )
    trainer = training.train_adapter(settings, str(tmp_path / "adapter"))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
