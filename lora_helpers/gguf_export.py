"""GGUF export of a merged Llama model, for llama.cpp and Ollama, written with the ``gguf`` package.

Taught in notebook 05 (section "Export to GGUF") and run in notebook 06. The Llama-3.2 QLoRA guide
clones llama.cpp and runs its ``convert_hf_to_gguf.py``; here the same file is written from Python with
``gguf`` (from PyPI), so it also works offline, for each Llama family the course trains:

- **tokenizer**: Llama-2's SentencePiece vocabulary through ``gguf.LlamaHfVocab`` (llama.cpp's "llama"
  tokenizer), Llama-3's and the tiny model's byte-level BPE with their merges (llama.cpp's "gpt2" tokenizer),
  the special tokens, BOS/EOS/pad and the chat template through ``gguf.SpecialVocab``. Added special tokens
  (``<|start_header_id|>``, ``<|eot_id|>``, ...) are typed as control tokens: otherwise llama.cpp splits them
  into characters and the model is prompted with ids it has never seen;
- **rope**: the query and key rows are permuted to llama.cpp's rotary layout, and Llama-3.1/3.2's ``llama3``
  rope scaling is written as llama.cpp's ``rope_freqs`` tensor of per-frequency factors;
- **tied embeddings** (Llama-3.2): no output tensor; llama.cpp reuses the token embeddings;
- **memory**: tensors are read and written one at a time, so an 8B export holds about one tensor in RAM,
  not the model (Colab has 12.7 GB).

The test of all this is llama.cpp itself: notebook 06 and ``tests/test_gguf_export.py`` check, per family,
that llama.cpp tokenizes the chat-templated prompt to the same ids as transformers and answers the same.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from pathlib import Path

import numpy as np

from lora_helpers import chat, files, runtimes

FILE_TYPES = ("F32", "F16", "Q8_0")  # written here; Q4_K_M is made from F16 by llama.cpp (quantize_gguf)
QUANTIZED_TYPES = ("Q4_K_M", "Q5_K_M")  # llama.cpp's K-quants, made from the F16 file


def parse_file_types(text: str) -> list[str]:
    """Notebook 05's ``gguf_types`` ("F16,Q8_0,Q4_K_M", any case) as the files to write, in the order to write them.

    An unknown name is refused with the known ones (before notebook 01, by the course runner); a K-quant brings the
    F16 file it is made from, which is then written and kept too. "" writes nothing.
    """
    requested = []
    for name in (part.strip().upper() for part in text.split(",")):
        if name and name not in requested:
            requested.append(name)
    unknown = [name for name in requested if name not in FILE_TYPES + QUANTIZED_TYPES]
    if unknown:
        raise ValueError(
            f"gguf_types: no GGUF file type {', '.join(unknown)}. Known: {', '.join(FILE_TYPES + QUANTIZED_TYPES)} "
            '(any case; "" exports nothing).'
        )
    if any(name in QUANTIZED_TYPES for name in requested) and "F16" not in requested:
        requested.insert(0, "F16")  # llama.cpp's quantizer reads it
    return sorted(requested, key=lambda name: name in QUANTIZED_TYPES)  # F16 before what is made from it


LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # the start of Llama-3's pre-tokenizer regex
UNSUPPORTED = (
    "GGUF export here writes Llama-architecture models; this one is {kind!r}. For other architectures use "
    "llama.cpp's own converter: python convert_hf_to_gguf.py run_dir/merged --outfile model.gguf"
)

TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    if hf_name in TENSOR_NAMES:
        return TENSOR_NAMES[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        layer, inner = parts[2], ".".join(parts[3:-1])
        if inner in LAYER_NAMES:
            return f"blk.{layer}.{LAYER_NAMES[inner]}.{parts[-1]}"
    raise ValueError(f"No GGUF name for tensor {hf_name!r}: only Llama-architecture models are supported.")


def permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama-3.1's rope scaling as one factor per frequency (llama.cpp's ``rope_freqs`` tensor).

    Frequencies whose wavelength is shorter than ``original_max_position_embeddings / high_freq_factor`` are
    kept, longer than ``.../ low_freq_factor`` divided by ``factor``, and those between interpolated, as
    transformers' ``_compute_llama3_parameters`` does.
    """
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's splitting rule: "llama-bpe" (Llama-3), "smollm" (SmolLM2:
    every digit on its own, then GPT-2's rule) or "gpt-2"."""
    text = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if LLAMA3_SPLIT in text or LLAMA3_SPLIT.replace("'", "\\u0027") in text:
        return "llama-bpe"
    if '"Digits"' in text and '"individual_digits": true' in text and '"ByteLevel"' in text:
        return "smollm"
    if '"ByteLevel"' in text:
        return "gpt-2"
    raise ValueError(f"Unknown pre-tokenizer {text[:200]}: use llama.cpp's convert_hf_to_gguf.py for this model.")


def space_after_special_token(tokenizer) -> bool:
    """Does transformers start text that follows a special token with SentencePiece's ``▁``?

    llama.cpp's SentencePiece tokenizer has one switch for this (``add_space_prefix``): it puts ``▁`` in front
    of the text after *every* special token, or never. transformers (``legacy=False``) puts it only at the very
    start of a text, never after ``<s>``. Chat prompts always start with a special token, so the file copies
    what transformers does there: then llama.cpp and transformers give a chat prompt the same ids.
    """
    ids = tokenizer(tokenizer.bos_token + "a", add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids[1]).startswith("\u2581")


def _pad(tokens: list, types: list, scores: list | None, vocab_size: int) -> None:
    """Fill the ids a model has embeddings for but its tokenizer never produces with unused placeholders, as
    llama.cpp's converter does: llama.cpp requires one token per embedding row (a vocabulary padded to a round
    size, or a random-weight model of a real shape with a tiny tokenizer)."""
    import gguf

    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _sentencepiece_vocabulary(writer, merged_dir: Path, tokenizer, vocab_size: int) -> int:
    """Llama-2's vocabulary: tokens and types from ``gguf.LlamaHfVocab``; scores in SentencePiece's order."""
    import gguf

    tokens, scores, types = [], [], []
    for index, (text, score, kind) in enumerate(gguf.LlamaHfVocab(merged_dir).all_tokens()):
        tokens.append(text)
        types.append(kind)
        # LlamaHfVocab writes a placeholder score. llama.cpp merges the pair with the highest score first, and a
        # SentencePiece BPE vocabulary is ordered by merge: the score of a piece is minus its id.
        scores.append(-float(index) if kind == gguf.TokenType.NORMAL else score)
    _pad(tokens, types, scores, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(space_after_special_token(tokenizer))
    return len(tokens)


def _byte_level_vocabulary(writer, tokenizer_json: dict, tokenizer, vocab_size: int) -> int:
    """Byte-level BPE (Llama-3, the tiny model): added special tokens typed as control tokens."""
    import gguf

    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    added = tokenizer.added_tokens_decoder
    types = []
    for index in range(len(tokens)):
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    _pad(tokens, types, None, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return len(tokens)


def _tokenizer_metadata(writer, merged_dir: Path, tokenizer, vocab_size: int) -> None:
    import gguf

    tokenizer_json = json.loads((merged_dir / "tokenizer.json").read_text())
    model = tokenizer_json["model"]
    if model["type"] == "BPE" and model.get("byte_fallback"):  # SentencePiece converted to tokenizer.json
        n_vocab, byte_level = _sentencepiece_vocabulary(writer, merged_dir, tokenizer, vocab_size), False
    elif model["type"] == "BPE" and model.get("merges"):
        n_vocab, byte_level = _byte_level_vocabulary(writer, tokenizer_json, tokenizer, vocab_size), True
    else:
        raise ValueError(UNSUPPORTED.format(kind=f"{model['type']} tokenizer"))
    special = gguf.SpecialVocab(merged_dir, load_merges=byte_level, n_vocab=n_vocab)
    special.add_special_token["bos"] = chat.tokenizer_adds_bos(tokenizer)
    special.add_to_gguf(writer, quiet=True)


def _hyperparameters(writer, config, name: str, file_type: str) -> int:
    import gguf

    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.num_key_value_heads or n_head)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(
        {
            "F32": gguf.LlamaFileType.ALL_F32,
            "F16": gguf.LlamaFileType.MOSTLY_F16,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[file_type]
    )
    return head_dim


def _tensor_sources(merged_dir: Path, config) -> dict:
    """``{hf name: (shard file, shape)}`` of every tensor to write, shard by shard; tied models have no ``lm_head``."""
    from safetensors import safe_open

    sources = {}
    for shard in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            sources.update({name: (shard, tuple(f.get_slice(name).get_shape())) for name in f.keys()})
    if config.tie_word_embeddings:
        sources.pop("lm_head.weight", None)  # llama.cpp reads the output head from token_embd
    return sources


def _storage(ndim: int, file_type: str):
    """How a tensor is stored in the file: (numpy dtype written, GGML quantized type or None).

    Norms (1-D) stay F32 in every file type; matrices follow the file type.
    """
    import gguf

    if ndim == 1 or file_type == "F32":
        return np.float32, None
    if file_type == "F16":
        return np.float16, None
    return np.uint8, gguf.GGMLQuantizationType.Q8_0


def _stored_size(shape: tuple, file_type: str) -> int:
    import gguf

    dtype, kind = _storage(len(shape), file_type)
    if kind is None:
        return math.prod(shape) * np.dtype(dtype).itemsize
    return gguf.quant_shape_to_byte_shape(shape, kind)[-1] * math.prod(shape[:-1])


def _rope_layout(name: str, rows: np.ndarray, config) -> np.ndarray:
    """The output rows of a query or key weight (or of a LoRA B over it) in llama.cpp's rotary layout; others as
    they are."""
    if name.endswith("self_attn.q_proj.weight"):
        return permute_for_rope(rows, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return permute_for_rope(rows, config.num_key_value_heads or config.num_attention_heads)
    return rows


@contextlib.contextmanager
def _atomic_gguf_writer(out_path: Path):
    """A Llama ``gguf.GGUFWriter`` writing beside ``out_path``: the file is renamed into place only when whole, and
    removed on any error (Ctrl-C included)."""
    import gguf

    tmp = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(tmp, arch="llama")
    try:
        yield writer
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(out_path)


def _convert(name: str, array: np.ndarray, config, file_type: str) -> np.ndarray:
    """One tensor as it goes into the file: rope rows permuted, then cast or quantized as ``_storage`` says."""
    import gguf

    array = _rope_layout(name, array, config)
    dtype, kind = _storage(array.ndim, file_type)
    return gguf.quants.quantize(array, kind) if kind is not None else array.astype(dtype)


def export_gguf(merged_dir: str | Path, out_path: str | Path, file_type: str = "F16") -> Path:
    """Write the merged model in ``merged_dir`` as a GGUF file (F32, F16 or Q8_0), atomically, one tensor at a time."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type={file_type!r}: write one of {FILE_TYPES}; make Q4_K_M with quantize_gguf().")
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    config = AutoConfig.from_pretrained(merged_dir)
    if config.model_type != "llama":
        raise ValueError(UNSUPPORTED.format(kind=config.model_type))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)

    with _atomic_gguf_writer(out_path) as writer:
        head_dim = _hyperparameters(writer, config, merged_dir.parent.name or "model", file_type)
        _tokenizer_metadata(writer, merged_dir, tokenizer, config.vocab_size)
        rope = getattr(config, "rope_parameters", None) or {}
        extra = {"rope_freqs.weight": llama3_rope_factors(rope, head_dim)} if rope.get("rope_type") == "llama3" else {}

        # Pass 1: the tensor table (names, shapes, types, sizes), written before any data.
        sources = _tensor_sources(merged_dir, config)
        for name, (_, shape) in sources.items():
            dtype, kind = _storage(len(shape), file_type)
            writer.add_tensor_info(
                gguf_name(name),
                shape,
                np.dtype(np.float32 if kind else dtype),
                _stored_size(shape, file_type),
                raw_dtype=kind,
            )
        for name, array in extra.items():
            writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # Pass 2: the data, in the same order, one tensor in memory at a time.
        for shard, group in itertools.groupby(sources.items(), key=lambda item: item[1][0]):
            with safe_open(shard, "pt") as f:
                for name, _ in group:
                    array = f.get_tensor(name).to(torch.float32).numpy()
                    writer.write_tensor_data(_convert(name, array, config, file_type))
                    del array
        for array in extra.values():
            writer.write_tensor_data(array)
    return out_path


def quantize_gguf(f16_path: str | Path, out_path: str | Path, kind: str = "Q4_K_M") -> Path:
    """Make a K-quant file from an F16 GGUF with llama.cpp's own quantizer (needs llama-cpp-python).

    llama.cpp writes a line per tensor to the process's stderr; that log goes to ``OUT_PATH.log`` beside the file
    instead of filling the notebook, and a failure quotes its end.
    """
    import llama_cpp

    types = {name: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}") for name in QUANTIZED_TYPES}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[kind]
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    log = out_path.with_name(f"{out_path.stem}.log")
    with files.c_stderr_to(log):
        status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), params)
    if status != 0:
        tmp.unlink(missing_ok=True)
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-10:])
        raise RuntimeError(
            f"llama.cpp could not quantize {f16_path} to {kind} (status {status}). Its log ends:\n{tail}"
        )
    tmp.replace(out_path)
    return out_path


ADAPTER_FILE_TYPES = ("F32", "F16")  # an adapter's B matrices have rows of r values, too short for Q8_0's blocks of 32


def llama_cpp_alpha(config: dict) -> float:
    """The ``adapter.lora.alpha`` to write so that llama.cpp, which always scales by alpha / r, scales as peft did.

    Plain LoRA: alpha. rsLoRA (``use_rslora``) scales by alpha / √r, so alpha·√r is written in its place.
    """
    alpha, r = float(config["lora_alpha"]), config["r"]
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha


def peft_scale(config: dict, layer: str) -> float:
    """peft's scale for one layer: alpha / r (alpha / √r with rsLoRA), after ``rank_pattern`` / ``alpha_pattern``."""
    import re

    def pattern_value(patterns: dict, default):  # peft's own matching (peft.tuners.tuners_utils)
        return next((v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", layer)), default)

    r = pattern_value(config.get("rank_pattern"), config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def export_adapter_gguf(adapter_dir, out_path, base_dir, file_type: str = "F16") -> Path:
    """Write a saved peft LoRA adapter as a llama.cpp LoRA file (what llama.cpp's ``convert_lora_to_gguf.py`` writes).

    Taught in notebook 06 ("Serve the adapters"). The file holds each layer's ``lora_a`` / ``lora_b`` under the base
    GGUF's tensor names, with the query and key rows of B in llama.cpp's rotary layout, and one alpha: llama.cpp
    scales every layer by alpha / rank, so rsLoRA's alpha is rewritten (``llama_cpp_alpha``) and a layer whose
    ``rank_pattern`` / ``alpha_pattern`` gives another scale has it folded into its B. What llama.cpp cannot run
    (DoRA, trained embeddings or output head, ``modules_to_save``) is refused with the cause and the fix
    (``runtimes``). ``base_dir`` is the base model's folder (its ``config.json`` gives the head counts).
    """
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    if file_type not in ADAPTER_FILE_TYPES:
        raise ValueError(f"file_type={file_type!r}: an adapter is written as one of {ADAPTER_FILE_TYPES}.")
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    lora_config, names = runtimes.refuse_unless_runs(adapter_dir, "llama.cpp / Ollama")
    config = AutoConfig.from_pretrained(base_dir)
    if config.model_type != "llama":
        raise ValueError(UNSUPPORTED.format(kind=config.model_type))
    alpha = llama_cpp_alpha(lora_config)
    layers = sorted({name.split(".lora_A")[0] for name in names if ".lora_A" in name})
    with _atomic_gguf_writer(out_path) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter_dir.name)
        dtype = np.float16 if file_type == "F16" else np.float32
        with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
            for layer in layers:
                hf_name = layer.removeprefix("base_model.model.")
                a = f.get_tensor(f"{layer}.lora_A.weight").to(torch.float32).numpy()
                b = f.get_tensor(f"{layer}.lora_B.weight").to(torch.float32).numpy()
                fold = peft_scale(lora_config, hf_name) / (alpha / a.shape[0])  # 1 unless a pattern differs
                if abs(fold - 1) > 1e-6:
                    b = b * fold
                target = gguf_name(hf_name + ".weight")
                writer.add_tensor(f"{target}.lora_a", a.astype(dtype))
                writer.add_tensor(f"{target}.lora_b", _rope_layout(hf_name + ".weight", b, config).astype(dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out_path


SYSTEM_SLOT, PROMPT_SLOT = "\x00SYSTEM\x00", "\x00PROMPT\x00"


def _renderings(tokenizer) -> tuple[str, str, int, int]:
    """One user turn rendered without and with a system prompt (placeholders), and where the two differ."""
    without = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT_SLOT}], tokenize=False, add_generation_prompt=True
    )
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_SLOT}, {"role": "user", "content": PROMPT_SLOT}],
        tokenize=False,
        add_generation_prompt=True,
    )
    start = next((i for i, (a, b) in enumerate(zip(without, with_system)) if a != b), len(without))
    end = 0
    while end < len(without) - start and without[len(without) - 1 - end] == with_system[len(with_system) - 1 - end]:
        end += 1
    return without, with_system, start, end


def default_system_prompt(tokenizer) -> str:
    """The system prompt the chat template writes when none is given ("" for most families).

    ChatML templates such as SmolLM2's put their own ("You are a helpful AI assistant named SmolLM, ...") in a
    conversation without a system turn; the model was trained and is asked with it, so Ollama must send it too.
    """
    without, with_system, start, end = _renderings(tokenizer)
    if with_system[start : len(with_system) - end] != SYSTEM_SLOT:
        return ""
    return without[start : len(without) - end]


def ollama_template(tokenizer) -> str:
    """The model's chat template for one turn, in Ollama's template language (``{{ .System }}``, ``{{ .Prompt }}``).

    Built from the tokenizer's own template, rendered with placeholders, so Ollama sends the model the text it
    was trained on whatever the family (Llama-2's ``[INST]``, Llama-3's headers with their date lines, ChatML...).
    The BOS token is left out: Ollama adds it, as the GGUF file says.
    """
    without, with_system, start, end = _renderings(tokenizer)
    # The part that only a system prompt adds, between what both renderings share at the start and the end.
    middle = with_system[start : len(with_system) - end]
    if not middle:  # the template drops the system prompt
        template = without
    elif middle == SYSTEM_SLOT:  # always there: empty (Llama-3) or a default (ChatML) without a system prompt
        template = with_system
    else:  # a block only a system prompt adds (Llama-2's <<SYS>>)
        template = with_system[:start] + "{{ if .System }}" + middle + "{{ end }}" + with_system[start + len(middle) :]
    template = template.replace(SYSTEM_SLOT, "{{ .System }}").replace(PROMPT_SLOT, "{{ .Prompt }}")
    if tokenizer.bos_token and template.startswith(tokenizer.bos_token) and chat.tokenizer_adds_bos(tokenizer):
        template = template[len(tokenizer.bos_token) :]
    return template


def check_ollama_text(text: str, name: str) -> None:
    """Refuse text that a Modelfile's triple-quoted field cannot hold: Ollama has no escape for three quotes."""
    if '"""' in (text or ""):
        raise ValueError(
            f'{name} contains """, which ends a triple-quoted field of an Ollama Modelfile early (Ollama has no '
            'escape for it). Write the quotes another way (“…”, or two " apart), or export with gguf_types="".'
        )


def write_modelfile(
    gguf_path: str | Path,
    out_path: str | Path,
    merged_dir: str | Path,
    system_prompt: str = "",
    adapter_path: str | Path | None = None,
) -> Path:
    """An Ollama ``Modelfile``: the GGUF file, the model's chat template, its stop tokens, greedy decoding.

    Taught in notebook 05; then ``ollama create my-model -f Modelfile`` and ``ollama run my-model``. With
    ``adapter_path`` (notebook 06), ``gguf_path`` is the base model and an ``ADAPTER`` line adds the LoRA file
    (``export_adapter_gguf``) over it: several Ollama models then share one base file.
    """
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    eos = (
        GenerationConfig.from_pretrained(merged_dir).eos_token_id
        if (Path(merged_dir) / "generation_config.json").exists()
        else None
    )
    eos = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
    stops = list(dict.fromkeys(tokenizer.convert_ids_to_tokens(eos)))
    lines = [f"FROM ./{Path(gguf_path).name}"]
    if adapter_path:
        lines.append(f"ADAPTER ./{Path(adapter_path).name}")
    lines.append(f'TEMPLATE """{ollama_template(tokenizer)}"""')
    system_prompt = system_prompt or default_system_prompt(tokenizer)  # the one training used
    check_ollama_text(system_prompt, "system_prompt")
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    Path(out_path).write_text("\n".join(lines) + "\n")
    return Path(out_path)
