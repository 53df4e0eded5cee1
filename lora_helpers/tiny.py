"""The tiny Llama: a real model directory, built offline, for CPU runs, tests and CI.

Taught in notebook 01 (what the tiny preset is) and used by every notebook when
``preset="tiny"``. The model has the Llama architecture (RMSNorm, rotary
attention with grouped-query heads, SwiGLU MLP) with random weights, and a
byte-level BPE tokenizer trained here on the course's own data, with a Llama-2
chat template. ``AutoModelForCausalLM`` and ``AutoTokenizer`` load it like any
hub model, so every notebook runs the same code on it as on Llama-2-7B.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from lora_helpers import data

# Bump when anything below changes, so cached copies are rebuilt.
TINY_VERSION = "tiny-llama-v1"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# The Llama-2 chat template as Meta's tokenizers ship it: `<s>[INST] user [/INST] answer </s>`,
# with an optional `<<SYS>>` block inside the first user turn.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Small enough to train in seconds on two CPU cores; every dimension is a multiple
# of 64 so that bitsandbytes quantizes each weight in whole NF4 blocks.
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    initializer_range=0.1,  # larger than Llama's 0.02, so logits are sharp enough to fit in a few epochs
)


def cache_root() -> Path:
    """Where built models are cached: $LORA_HELPERS_CACHE, else ~/.cache/lora_helpers."""
    return Path(os.environ.get("LORA_HELPERS_CACHE", Path.home() / ".cache" / "lora_helpers"))


def tiny_model_dir() -> Path:
    """Return the tiny model's directory, building it on first use (a few seconds)."""
    target = cache_root() / TINY_VERSION
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename into place, so an interrupted build
    # never leaves a half-written model that later runs would load.
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=target.parent))
    try:
        build_tiny_model(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def training_corpus() -> list[str]:
    """The course's own texts, which the tiny tokenizer is trained on."""
    texts = []
    for name in ("about_me.jsonl", "persona_captain.jsonl"):
        for row in data.read_jsonl(data.packaged_data_path(name)):
            texts.extend(m["content"] for m in row["messages"])
    for row in data.read_jsonl(data.packaged_data_path("guanaco_llama2_sample.jsonl")):
        texts.append(row["text"])
    texts.append("[INST] [/INST] <<SYS>> <</SYS>> You are a helpful assistant.")
    return texts


def build_tokenizer():
    """Train a byte-level BPE tokenizer that adds `<s>` at the start, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",  # its own token, not EOS: notebook 02 explains why
        chat_template=LLAMA2_CHAT_TEMPLATE,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Llama and its tokenizer to ``out_dir`` (safetensors)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tiny_model.json").write_text(
        json.dumps({"version": TINY_VERSION, "seed": seed, "note": "random weights, built offline"}, indent=2)
    )
    return out_dir
