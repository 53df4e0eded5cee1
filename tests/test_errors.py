"""Errors a learner meets: raised early, naming the cause and the fix."""

import json
import warnings

import pytest
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lora_helpers import adapters, course, data, device, models


@pytest.fixture()
def saved_adapter(tmp_path, tiny_model_4bit):
    model = get_peft_model(tiny_model_4bit, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_fits_its_own_base(saved_adapter, tiny_model_4bit):
    adapters.check_adapter_matches_base(saved_adapter, tiny_model_4bit)


def test_adapter_onto_another_base_names_both(saved_adapter):
    with init_empty_weights():
        other = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024
            )
        )
    other.name_or_path = "some/other-model"
    with pytest.raises(ValueError, match=r"trained for '.*tiny-llama-v1'.*'some/other-model'.*expects 128 -> 128"):
        adapters.check_adapter_matches_base(saved_adapter, other)


def test_pickled_adapter_is_refused(saved_adapter, tiny_model_4bit):
    (saved_adapter / "adapter_model.safetensors").rename(saved_adapter / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        adapters.check_adapter_matches_base(saved_adapter, tiny_model_4bit)


def test_missing_adapter_says_to_run_notebook_04(tmp_path, tiny_model_4bit):
    with pytest.raises(FileNotFoundError, match="notebook 04"):
        adapters.check_adapter_matches_base(tmp_path / "adapter", tiny_model_4bit)


def test_every_example_too_long_is_refused():
    assert data.check_lengths([10, 300], 128) == 1
    with pytest.raises(ValueError, match="Every example is longer than max_length=8"):
        data.check_lengths([10, 300], 8)


def test_4bit_where_bitsandbytes_cannot_run(monkeypatch, tiny_dir):
    monkeypatch.setattr(device, "check_4bit", lambda: (False, "bitsandbytes 4-bit does not run on cpu here"))
    with pytest.raises(RuntimeError, match="does not run"):
        models.load_model("tiny", load_in_4bit=True)


def test_remote_code_is_off_and_warned_about_when_on(tiny_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.load_tokenizer("tiny")
    with pytest.warns(UserWarning, match="trust_remote_code=True"):
        models.load_tokenizer("tiny", trust_remote_code=True)


def test_merging_without_a_trained_run_fails_in_notebook_05(tmp_path):
    with pytest.raises(course.NotebookFailed, match="05_merge.*run notebook 04"):
        course.run_course("tiny", tmp_path, only=["05"])
    assert json.loads((tmp_path / "summary.json").read_text())["error"]["type"] == "FileNotFoundError"
