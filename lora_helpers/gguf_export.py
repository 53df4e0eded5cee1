"""GGUF export of a merged Llama model, for llama.cpp and Ollama (seed 002), written with the ``gguf`` package.

Taught in notebook 05 (section "Export to GGUF") and run in notebook 06. The
seed clones llama.cpp and runs its ``convert_hf_to_gguf.py``; here the same
file is written from Python with ``gguf`` (from PyPI), so it also works offline:
model hyper-parameters, the tokenizer (byte-level BPE with its merges), the chat
template, and every weight, renamed to llama.cpp's names. Two details matter:
the query and key rows are permuted to llama.cpp's rotary layout, and the
pre-tokenizer name must match the tokenizer's splitting rule, or llama.cpp
tokenizes differently from transformers.

Supported: Llama-architecture models with a byte-level BPE tokenizer (the tiny
model, Llama-3). Llama-2's SentencePiece tokenizer needs llama.cpp's own
converter: the error says how.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lora_helpers import data

FILE_TYPES = ("F32", "F16", "Q8_0")  # written here; Q4_K_M is made from F16 by llama.cpp (quantize_gguf)
LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # the start of Llama-3's pre-tokenizer regex
NOT_BYTE_LEVEL_BPE = (
    "The tokenizer is not byte-level BPE (Llama-2 uses SentencePiece). For such models use llama.cpp's "
    "converter, as seed 002 does: python convert_hf_to_gguf.py run_dir/merged --outfile model.gguf"
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


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's splitting rule: "gpt-2" (plain byte-level) or "llama-bpe" (Llama-3)."""
    text = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if LLAMA3_SPLIT in text or LLAMA3_SPLIT.replace("'", "\\u0027") in text:
        return "llama-bpe"
    if '"ByteLevel"' in text:
        return "gpt-2"
    raise ValueError(NOT_BYTE_LEVEL_BPE)


def _tokenizer_metadata(writer, merged_dir: Path, tokenizer) -> None:
    import gguf

    tokenizer_json = json.loads((merged_dir / "tokenizer.json").read_text())
    if tokenizer_json["model"]["type"] != "BPE" or not tokenizer_json["model"].get("merges"):
        raise ValueError(NOT_BYTE_LEVEL_BPE)
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("pad", tokenizer.pad_token_id),
        ("unk", tokenizer.unk_token_id),
    ):
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(data.tokenizer_adds_bos(tokenizer))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(merged_dir: str | Path, out_path: str | Path, file_type: str = "F16") -> Path:
    """Write the merged model in ``merged_dir`` as a GGUF file (F32, F16 or Q8_0), atomically."""
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type={file_type!r}: write one of {FILE_TYPES}; make Q4_K_M with quantize_gguf().")
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    config = AutoConfig.from_pretrained(merged_dir)
    if config.model_type != "llama":
        raise ValueError(
            f"GGUF export here supports Llama models; this one is {config.model_type!r}. "
            "Use llama.cpp's convert_hf_to_gguf.py for other architectures."
        )
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    tmp = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(tmp, arch="llama")
    writer.add_name(merged_dir.parent.name or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(
        {
            "F32": gguf.LlamaFileType.ALL_F32,
            "F16": gguf.LlamaFileType.MOSTLY_F16,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[file_type]
    )
    _tokenizer_metadata(writer, merged_dir, tokenizer)

    weights = {}
    for shard in sorted(merged_dir.glob("*.safetensors")):
        weights.update(load_file(shard))
    if "lm_head.weight" not in weights:  # tied embeddings
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    for name, array in weights.items():
        array = array.astype(np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            array = permute_for_rope(array, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            array = permute_for_rope(array, n_kv)
        if array.ndim == 1 or file_type == "F32":  # norms stay in F32 in every file type
            writer.add_tensor(gguf_name(name), array)
        elif file_type == "F16":
            writer.add_tensor(gguf_name(name), array.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(out_path)
    return out_path


def quantize_gguf(f16_path: str | Path, out_path: str | Path, kind: str = "Q4_K_M") -> Path:
    """Make a K-quant file from an F16 GGUF with llama.cpp's own quantizer (needs llama-cpp-python)."""
    import llama_cpp

    types = {"Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[kind]
    tmp = Path(out_path).with_name(f".{Path(out_path).name}.partial")
    status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), params)
    if status != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {f16_path} to {kind} (status {status}).")
    tmp.replace(out_path)
    return Path(out_path)


OLLAMA_LLAMA2_TEMPLATE = "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]"


def write_modelfile(gguf_path: str | Path, out_path: str | Path, chat_format: str, system_prompt: str = "") -> Path:
    """An Ollama ``Modelfile`` with the model's chat template and stop tokens (seed 002's recipe, for Llama-2)."""
    gguf_path = Path(gguf_path)
    lines = [f"FROM ./{gguf_path.name}"]
    if chat_format == "llama2":
        lines.append(f'TEMPLATE """{OLLAMA_LLAMA2_TEMPLATE}"""')
        stops = ["</s>", "[INST]"]
    else:  # Ollama reads the Jinja chat template stored in the GGUF file for most templates
        stops = ["<|eot_id|>", "<|end_of_text|>"]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    Path(out_path).write_text("\n".join(lines) + "\n")
    return Path(out_path)
