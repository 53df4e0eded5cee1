import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from lora_helpers import shipped_configs, tiny


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


def test_tiny_is_deterministic_and_cached_for_every_family(tmp_path, fresh_cache):
    for name in ("tiny-llama2", "tiny-llama3"):
        built = tiny.tiny_model_dir(name)
        assert tiny.tiny_model_dir(name) == built
        again = tiny.build_tiny_model(tmp_path / name, name=name)
        first, second = load_file(built / "model.safetensors"), load_file(again / "model.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
            assert (built / file).read_text() == (again / file).read_text(), (name, file)


def test_llama2_twin_has_the_traits_of_meta_checkpoints(fresh_cache):
    from transformers import AutoConfig, GenerationConfig

    directory = tiny.tiny_model_dir("tiny-llama2")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = AutoConfig.from_pretrained(directory)
    assert (directory / "tokenizer.model").exists() and (directory / "tokenizer.json").exists()
    saved = json.loads((directory / "tokenizer_config.json").read_text())
    assert saved["legacy"] is False and saved["add_bos_token"] is True
    tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
    assert tokenizer_json["model"]["type"] == "BPE" and tokenizer_json["model"]["byte_fallback"] is True
    assert tokenizer.pad_token is None and tokenizer.unk_token == "<unk>"
    assert tokenizer("Ünïcödé 🙂")["input_ids"][0] == tokenizer.bos_token_id
    assert "<0xF0>" in tokenizer.convert_ids_to_tokens(tokenizer("🙂")["input_ids"])  # byte fallback
    assert config.num_key_value_heads == config.num_attention_heads  # multi-head attention
    assert config.rope_parameters["rope_theta"] == 10000.0 and not config.tie_word_embeddings
    assert GenerationConfig.from_pretrained(directory).do_sample is True  # Llama-2-chat samples by default


def test_llama3_twin_has_the_traits_of_llama3(fresh_cache):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = tiny.tiny_model_dir("tiny-llama3")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = AutoConfig.from_pretrained(directory)
    special = [tokenizer.convert_tokens_to_ids(t) for t in tiny.LLAMA3_SPECIAL_TOKENS]
    assert special == list(range(1024 - len(special), 1024))  # after the vocabulary, in Llama-3.1's order
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token is None
    split = [word for word, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("it's 20245 ok")]
    assert split == ["it", "'s", "\u0120", "202", "45", "\u0120ok"]  # Llama-3's rule: contractions, 1-3 digits
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    assert config.tie_word_embeddings
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    stops = GenerationConfig.from_pretrained(directory).eos_token_id
    assert set(tokenizer.convert_ids_to_tokens(stops)) == {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"}


@pytest.mark.parametrize(
    "shape, vocab, family", [("llama-2-7b", 32000, "tiny-llama2"), ("llama-3.1-8b", 128256, "tiny-llama3")]
)
def test_real_size_models_keep_the_real_vocabulary_and_the_family_tokenizer(small_real_size, shape, vocab, family):
    from lora_helpers import chat, models

    directory = tiny.real_size_model_dir(shape)
    twin = tiny.tiny_model_dir(family)
    config = json.loads((directory / "config.json").read_text())
    real = LlamaConfig(**shipped_configs.values(shape))
    assert config["vocab_size"] == vocab and config["rope_parameters"] == real.rope_parameters  # llama3 rope for 3.1
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (directory / name).read_bytes() == (twin / name).read_bytes(), name
    assert (directory / "tokenizer.model").exists() == (family == "tiny-llama2")  # SentencePiece's model file
    assert not (directory / "tiny_model.json").exists()
    tokenizer = models.load_tokenizer(str(directory), chat_format="auto")
    model = models.load_model(str(directory), load_in_4bit=True)
    assert model.config.eos_token_id == json.loads((twin / "config.json").read_text())["eos_token_id"]
    ids = chat.prompt_ids(tokenizer, chat.question_messages("What is your name?", ""))
    assert max(ids) < len(tokenizer) < vocab
    assert model(torch.tensor([ids])).logits.shape[-1] == vocab


def test_random_weights_replace_the_presets_model_before_notebook_01(small_real_size, tmp_path):
    from lora_helpers import course

    summary = course.run_course(
        "llama2-7b-about-me", tmp_path / "run", only=["01", "02"], random_weights=True, params={"max_new_tokens": 4}
    )
    assert summary["status"] == "ok"
    assert summary["parameters"]["model_id"] == str(tiny.real_size_model_dir("llama-2-7b"))
    with pytest.raises(ValueError, match="No random-weight twin of 'gpt2'"):
        tiny.real_size_name("gpt2")


def test_building_tiny_leaves_the_callers_random_state_alone(tmp_path):
    """A seeded run that builds tiny on first use must initialise its adapters as every later run does."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_model(tmp_path / "tiny")
    assert torch.equal(torch.rand(3), expected)
