"""model_id may name any causal LM: targets are read from the model, so other architectures train too."""

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lora_helpers import chat, evaluate, lora, merge, models, plan, presets, training

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

    # The planner reads the config under its own names, and counts what peft trains.
    estimate = plan.plan(settings, compute_bytes=4)
    assert estimate["trainable"] == trainer.model.get_nb_trainable_parameters()[0]
    assert estimate["peak_gb"] > 0 and estimate["parts_gb"]["activations"] > 0
    # Merge (notebook 05's way, into the dequantized base): the merged model computes base + adapter.
    tokenizer = models.load_tokenizer(str(tmp_path / "adapter"))
    base = merge.load_base_for_merge(settings, "dequantized", torch.float32, tokenizer)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
    prompts = [chat.prompt_ids(tokenizer, chat.question_messages("What is your name?"))]
    before = evaluate.prompt_logits(with_adapter, prompts)
    merged = with_adapter.merge_and_unload(safe_merge=True)
    assert evaluate.max_difference(evaluate.prompt_logits(merged, prompts), before) < 1e-4


def neox_tokenizer():
    """A GPT-NeoX-style tokenizer: byte-level BPE, one `<|endoftext|>` for BOS, EOS and unknown, no pad, no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lora_helpers import tiny

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=960,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny.training_corpus(), trainer=trainer)
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=end, eos_token=end, unk_token=end)


@pytest.mark.course
def test_a_gpt_neox_model_runs_the_whole_course(tmp_path):
    """`-p model_id=<a GPT-NeoX model>`: no num_key_value_heads, fused query_key_value, no pad, no chat template."""
    import json

    from transformers import GPTNeoXConfig

    from lora_helpers import course

    tokenizer = neox_tokenizer()
    assert tokenizer.pad_token is None and tokenizer.chat_template is None
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        intermediate_size=256,
        max_position_embeddings=512,
        initializer_range=0.1,
        **SMALL,
    )
    model_dir = tmp_path / "neox"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    run_dir = tmp_path / "run"
    summary = course.run_course(  # notebook 08 and the harness are the tiny run's (test_course_run.py): CI's time
        "tiny",
        run_dir,
        only=["01", "02", "03", "04", "05", "06", "07"],
        params={"model_id": str(model_dir), "num_train_epochs": 30, "learning_rate": 3e-3, "run_lm_eval": False},
    )
    assert summary["status"] == "ok" and len(summary["notebooks"]) == 7  # 07 trains it with two processes too
    adapter = AutoTokenizer.from_pretrained(run_dir / "adapter")
    assert adapter.pad_token == "<pad>" and adapter.pad_token_id == len(tokenizer)  # a new token, only here
    assert "[INST]" in adapter.chat_template  # Llama-2's format for a model that had none
    assert json.loads((run_dir / "merge_check.json").read_text())["max_abs_logit_delta"] < 1e-4
    assert AutoConfig.from_pretrained(run_dir / "merged").vocab_size == len(tokenizer) + 1
    assert not (run_dir / "gguf").exists() or not list((run_dir / "gguf").glob("*.gguf"))
    merge_nb = (run_dir / "notebooks" / "05_merge.ipynb").read_text()
    assert "convert_hf_to_gguf.py" in merge_nb  # GGUF skipped, naming the converter to use
    inference_nb = (run_dir / "notebooks" / "06_inference.ipynb").read_text()
    assert "not served: " in inference_nb and not (run_dir / "serve" / "base-F16.gguf").exists()  # said, not failed
    assert summary["exact_match"]["fine_tuned"] >= 0.5 and summary["exact_match"]["base"] <= 0.05
