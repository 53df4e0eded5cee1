"""Tiny models built offline: ``tiny`` for a first look, and tiny twins of the presets' real model families.

Taught in notebook 01 (section "Presets") and used by every notebook when the preset's model is one of them.
Each is a real model directory (safetensors, tokenizer, chat template, generation config) with random weights
and 2 decoder layers, loaded by ``AutoModelForCausalLM`` / ``AutoTokenizer`` like any Hub model, so every
notebook runs the same code on it as on a 7B model. The twins keep every trait of their family that changes
the code path, because ``tiny`` alone would hide them:

- ``tiny``: a Llama with a byte-level BPE tokenizer of its own, a ``<pad>`` token and Llama-2's chat
  template. Fast, forgiving, like no real checkpoint.
- ``tiny-llama2`` (Llama-2-7B chat): a SentencePiece BPE tokenizer with byte fallback, trained here with
  ``sentencepiece`` and saved as Meta's repositories are (``tokenizer.model`` and ``tokenizer.json``,
  ``legacy=False``, BOS added, **no pad token**), Meta's chat template, multi-head attention, and
  Llama-2-chat's generation config, which samples by default.
- ``tiny-llama3`` (Llama-3.2-3B / 3.1-8B Instruct): byte-level BPE with Llama-3's split rule and its special
  tokens after the vocabulary, ``<|eot_id|>`` as EOS with a list of stop tokens in the generation config,
  the Llama-3.1 chat template (a system header with the knowledge-cutoff and date lines), **no pad token**,
  grouped-query attention, ``llama3`` rope scaling with ``rope_theta`` 500000, and tied embeddings.

The configs are the shipped ``configs/*.json`` of the real models with only the sizes shrunk.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lora_helpers import chat, data, files, shipped_configs

# Model names the course builds instead of downloading, and the cache folder of each (bump a version when
# anything below changes for that model, so cached copies are rebuilt).
TINY_MODELS = {"tiny": "tiny-llama-v1", "tiny-llama2": "tiny-llama2-v1", "tiny-llama3": "tiny-llama3-v1"}
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

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
SHRUNK = {k: TINY_CONFIG[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "initializer_range")}

# Llama-3's pre-tokenizer: how text is split before byte-level BPE (contractions, words, 1-3 digits, ...).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Llama-3.1's special tokens, in their order after the vocabulary (the real models reserve 256 places).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    *[f"<|reserved_special_token_{i}|>" for i in range(3, 8)],
]
# Llama-3.1 Instruct's chat template without its tool-calling branches: the system header always carries
# the knowledge cutoff and a date, and every turn ends with <|eot_id|>.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    '{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    '{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}'
    '{{- "Today Date: " + date_string + "\\n\\n" }}'
    "{{- system_message }}"
    '{{- "<|eot_id|>" }}'
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def tiny_model_dir(name: str = "tiny") -> Path:
    """Return the directory of the tiny model ``name``, building it on first use (seconds)."""
    if name not in TINY_MODELS:
        raise ValueError(f"Unknown tiny model {name!r}: the course builds {', '.join(TINY_MODELS)}.")
    target = files.cache_root() / TINY_MODELS[name]
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename into place, so an interrupted build
    # never leaves a half-written model that later runs would load.
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODELS[name]}-", dir=target.parent))
    try:
        build_tiny_model(tmp, name=name)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def training_corpus() -> list[str]:
    """The course's own texts, which the tiny tokenizers are trained on."""
    texts = []
    for name in ("about_me.jsonl", "persona_captain.jsonl"):
        for row in data.read_jsonl(data.packaged_data_path(name)):
            texts.extend(m["content"] for m in row["messages"])
    for row in data.read_jsonl(data.packaged_data_path("guanaco_llama2_sample.jsonl")):
        texts.append(row["text"])
    texts.append("[INST] [/INST] <<SYS>> <</SYS>> You are a helpful assistant.")
    texts.append("system user assistant Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024")
    return texts


def build_tokenizer():
    """``tiny``'s tokenizer: byte-level BPE trained on the course's texts, adding `<s>` in front like Llama's."""
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
        chat_template=chat.LLAMA2_CHAT_TEMPLATE,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def build_llama2_tokenizer(out_dir: Path):
    """A Llama-2-style tokenizer: SentencePiece BPE with byte fallback, trained here; no pad token.

    Written to ``out_dir`` as Meta's repositories hold it: ``tokenizer.model`` (SentencePiece, what llama.cpp's
    converter reads), ``tokenizer.json`` (what transformers loads) and ``tokenizer_config.json`` with
    ``legacy: false``. Returns the tokenizer.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        # Llama-2's trainer settings (read from its tokenizer.model), with the vocabulary scaled down.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(training_corpus()),
            model_prefix=str(work / "tokenizer"),
            model_type="bpe",
            vocab_size=VOCAB_SIZE,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,  # the same model on every machine
            minloglevel=2,
        )
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": False,
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
        }
        (work / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = AutoTokenizer.from_pretrained(work)  # converts tokenizer.model, as for Meta's checkpoints
        tokenizer.chat_template = chat.LLAMA2_CHAT_TEMPLATE
        shutil.copy(work / "tokenizer.model", out_dir / "tokenizer.model")
    return tokenizer


# What Meta's Llama-2 tokenizer_config.json says and transformers 5 no longer writes back on save.
LLAMA2_TOKENIZER_CONFIG = {"legacy": False, "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096}


def build_llama3_tokenizer():
    """A Llama-3-style tokenizer: byte-level BPE with Llama-3's split rule, special tokens after the vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eot_id|>",  # the Instruct models' tokenizer config; the base models end with <|end_of_text|>
        chat_template=LLAMA31_CHAT_TEMPLATE,
        model_max_length=131072,
        clean_up_tokenization_spaces=True,
    )


def shipped_config(name: str, **changes):
    """A real model's shipped ``configs/NAME.json`` as a ``LlamaConfig``, with ``changes`` applied.

    Its fp16 ``torch_dtype`` is dropped: the weights written here decide their own dtype.
    """
    from transformers import LlamaConfig

    values = shipped_configs.values(name)
    values.pop("torch_dtype", None)
    return LlamaConfig(**{**values, **changes})


def build_tiny_model(out_dir: str | Path, seed: int = 0, name: str = "tiny") -> Path:
    """Write the tiny model ``name`` (random weights, its tokenizer and configs) to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if name == "tiny":
        tokenizer = build_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_CONFIG,
        )
        generation = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    elif name == "tiny-llama2":
        tokenizer = build_llama2_tokenizer(out_dir)
        heads = TINY_CONFIG["num_attention_heads"]
        config = shipped_config(
            "llama-2-7b",
            **SHRUNK,
            vocab_size=len(tokenizer),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=4096,
        )
        # Llama-2-7b-chat-hf's generation_config.json: it samples unless told otherwise.
        generation = GenerationConfig(
            bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.6, top_p=0.9, max_length=4096
        )
    elif name == "tiny-llama3":
        tokenizer = build_llama3_tokenizer()
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in LLAMA3_SPECIAL_TOKENS}
        stops = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
        config = shipped_config(
            "llama-3.2-3b",
            **SHRUNK,
            vocab_size=len(tokenizer),
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=stops,
        )
        generation = GenerationConfig(
            bos_token_id=ids["<|begin_of_text|>"], eos_token_id=stops, do_sample=True, temperature=0.6, top_p=0.9
        )
    else:
        raise ValueError(f"Unknown tiny model {name!r}: the course builds {', '.join(TINY_MODELS)}.")
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was (a seeded run builds tiny
        torch.manual_seed(seed)  # on first use, and must then initialise its adapters as every later run does)
        model = LlamaForCausalLM(config)
    model.generation_config = generation
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if name == "tiny-llama2":
        saved = json.loads((out_dir / "tokenizer_config.json").read_text())
        (out_dir / "tokenizer_config.json").write_text(json.dumps({**saved, **LLAMA2_TOKENIZER_CONFIG}, indent=2))
    (out_dir / "tiny_model.json").write_text(
        json.dumps(
            {"name": name, "version": TINY_MODELS[name], "seed": seed, "note": "random weights, built offline"},
            indent=2,
        )
    )
    return out_dir


# The benchmark's `mid` model (15M parameters, random weights, trains on a CPU); the real shapes are below.
MID_CONFIG = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
)
RANDOM_MODELS = ("mid",)
GB = 2**30


def write_random_model(
    config, target: Path, tokenizer=None, max_shard_bytes: int = 2 * GB, files_from: Path | None = None
) -> Path:
    """A Llama with random weights and this ``config``'s exact shapes, written as fp16 safetensors shards.

    Tensors are made one at a time from the model's shapes on the meta device, so a 7B model needs about one
    shard of memory, not 13 GB. Linear and embedding weights ~ N(0, initializer_range); norms are ones. The
    tokenizer is ``tokenizer`` saved, or every tokenizer and generation file of the model in ``files_from``.
    """
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        shapes = {name: t.shape for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    # On a GPU the random numbers are drawn there (seconds instead of minutes for an 8B model's 8 billion)
    where = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(where).manual_seed(0)
    weight_map = {}
    with files.atomic_dir(target) as tmp:
        for index, names in enumerate(shards, 1):
            filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                if name.endswith("norm.weight"):
                    tensors[name] = torch.ones(shapes[name], dtype=torch.float16)
                else:
                    std = config.initializer_range
                    tensors[name] = (
                        torch.empty(shapes[name], device=where).normal_(0, std, generator=generator).half().cpu()
                    )
                weight_map[name] = filename
            save_file(tensors, Path(tmp) / filename, metadata={"format": "pt"})
        total = sum(2 * shapes[name].numel() for name in weight_map)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (Path(tmp) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for source in sorted(Path(files_from).iterdir()) if files_from else []:
            if source.name not in ("config.json", "tiny_model.json") and not source.name.startswith("model"):
                shutil.copy2(source, Path(tmp) / source.name)
    return target


def random_model_dir(name: str = "mid") -> Path:
    """The benchmark's random-weight ``mid`` model with ``tiny``'s tokenizer, built once into the cache."""
    from transformers import LlamaConfig

    if name not in RANDOM_MODELS:
        raise ValueError(f"Unknown random-weight model {name!r}. Choose one of: {', '.join(RANDOM_MODELS)}.")
    target = files.cache_root() / f"bench-{name}-v2"
    if (target / "config.json").exists():
        return target
    tokenizer = build_tokenizer()
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False, **MID_CONFIG, **special
    )
    return write_random_model(config, target, tokenizer)


# The presets' real models, rebuilt with random weights: each shipped config's exact shapes (vocabulary size
# included) and its family's tokenizer, chat template and generation config from the tiny twin. The twin's ids
# are all below the real vocabulary size; the embedding rows above them are never used.
REAL_SIZE_FAMILY = {"llama-2-7b": "tiny-llama2", "llama-3.2-3b": "tiny-llama3", "llama-3.1-8b": "tiny-llama3"}


def real_size_name(model_id: str) -> str:
    """The shipped shape (``llama-2-7b``, ...) of a preset's model id, or of a shape name itself."""
    name = shipped_configs.BY_MODEL_ID.get(model_id, model_id)
    if name not in REAL_SIZE_FAMILY:
        raise ValueError(
            f"No random-weight twin of {model_id!r}: --random-weights knows the presets' models "
            f"({', '.join(sorted(m for m, shape in shipped_configs.BY_MODEL_ID.items() if shape in REAL_SIZE_FAMILY))}) and the "
            f"shapes {', '.join(REAL_SIZE_FAMILY)}."
        )
    return name


def real_size_model_dir(name: str) -> Path:
    """A random-weight model with the exact shapes of ``name`` (``REAL_SIZE_FAMILY``), built once into the cache.

    The course runner's ``--random-weights`` runs every notebook on it: the memory and time of the real model,
    the family's tokenizer and template, no download (13 GB of fp16 shards for Llama-2-7B, 16 GB for 3.1-8B).
    """
    family = REAL_SIZE_FAMILY[real_size_name(name)]
    target = files.cache_root() / f"real-size-{name}-v1"
    if (target / "config.json").exists():
        return target
    twin = tiny_model_dir(family)
    twin_config = json.loads((twin / "config.json").read_text())
    special = {k: twin_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return write_random_model(shipped_config(name, **special), target, files_from=twin)
