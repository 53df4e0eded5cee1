from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_helpers import data, tiny


def test_tiny_model_is_an_ordinary_model_directory(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (Path(tiny_dir) / "model.safetensors").exists()
    assert model.config.vocab_size == len(tokenizer) == tiny.VOCAB_SIZE
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention


def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    again = tiny.build_tiny_model(tmp_path / "again")
    first, second = load_file(Path(tiny_dir) / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (Path(tiny_dir) / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_tiny_model_is_cached(tiny_dir):
    assert tiny.tiny_model_dir() == tiny_dir


def test_tokenizer_adds_bos_and_round_trips_text(tiny_tokenizer):
    text = "What is your favourite sound? A low C on a sixteen-foot pipe. Ünïcödé too."
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_is_llama2_format(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == data.format_llama2(messages)
    assert rendered == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST] Ciao </s>"
