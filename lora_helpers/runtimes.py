"""Where can this adapter run? Its config and weights read runtime by runtime: peft, a merge, llama.cpp / Ollama, vLLM.

Taught in notebook 06 ("Where can this adapter run?"). Each runtime implements part of what peft can train, and each
refuses the rest in its own way, often only when the model is already loading. Read from ``adapter_config.json`` and
the names in ``adapter_model.safetensors`` (no model is loaded), the answer is a verdict and a fix per runtime:

- **DoRA** (``use_dora``) stores a magnitude vector per layer: peft and a merge run it; llama.cpp's converter and vLLM
  refuse it. Fix: merge (notebook 05) and serve the merged model.
- **rsLoRA** (``use_rslora``) scales by α/√r; llama.cpp always uses α/r, so the GGUF adapter is written with α·√r in
  its place (done by ``gguf_export.export_adapter_gguf``); vLLM reads ``use_rslora`` itself.
- **modules_to_save** (a trained copy of a whole layer, e.g. ``lm_head`` after adding a ``<pad>`` row), **trained
  embeddings or output head**: llama.cpp's converter exits on them and vLLM refuses ``modules_to_save``.
- **PiSSA / OLoRA / CorDA initialisations** change the base weights: saved as they are, the adapter only fits the
  changed base it was trained on. peft converts it to an ordinary LoRA (of twice the rank) when it is saved with
  ``path_initial_model_for_weight_conversion``; after that, it runs anywhere LoRA runs.
- **rank above 16**: vLLM loads it only when started with ``max_lora_rank`` at least that high.
"""

from __future__ import annotations

from pathlib import Path

from lora_helpers import files

RUNTIMES = ("peft", "merge", "llama.cpp / Ollama", "vLLM")
BASE_CHANGING_INITS = ("pissa", "olora", "corda")  # initialisations that rewrite the base weights
VLLM_DEFAULT_MAX_RANK = 16
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of this rank (at least its default, 16)."""
    return next((value for value in VLLM_RANKS if value >= max(rank, VLLM_DEFAULT_MAX_RANK)), rank)


def adapter_contents(adapter_dir) -> tuple[dict, list[str]]:
    """``adapter_config.json`` and the tensor names of ``adapter_model.safetensors`` (header only)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"No adapter in {adapter_dir}: it has no adapter_config.json (notebook 04 writes one).")
    config = files.read_json(config_path)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_model.safetensors (a pickled .bin is not read: loading it can run code). "
            "Re-save the adapter with save_pretrained()."
        )
    try:
        with safe_open(weights, "pt") as f:
            names = list(f.keys())
    except Exception as error:  # safetensors' own error for a truncated or foreign file
        raise ValueError(f"{weights} is damaged ({type(error).__name__}: {error}): save the adapter again.") from None
    return config, names


def _init_name(config: dict) -> str:
    init = config.get("init_lora_weights", True)
    return init.lower().split("_")[0] if isinstance(init, str) else ""


def problems(config: dict, names: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Per runtime, the (cause, fix) pairs that stop it running this adapter; an empty list means it runs."""
    found = {runtime: [] for runtime in RUNTIMES}
    if config.get("peft_type", "LORA") != "LORA":
        cause = f"a {config.get('peft_type')} adapter, not LoRA"
        return {runtime: [(cause, "these runtimes run LoRA adapters; use peft")] for runtime in RUNTIMES[1:]} | {
            "peft": []
        }
    init = _init_name(config)
    if init in BASE_CHANGING_INITS:
        cause = f"init_lora_weights={config['init_lora_weights']!r} changed the base weights it was trained on"
        fix = (
            "save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) to convert it to an "
            "ordinary LoRA of the original base"
        )
        for runtime in RUNTIMES:
            found[runtime].append((cause, fix))
    if config.get("use_dora") or any("lora_magnitude_vector" in name for name in names):
        cause, fix = "DoRA (use_dora=True) has a magnitude vector per layer", "merge it (notebook 05) and serve that"
        found["llama.cpp / Ollama"].append((cause, fix))
        found["vLLM"].append((cause, fix))
    saved_whole = sorted(
        {name.split(".modules_to_save")[0].rsplit(".", 1)[-1] for name in names if "modules_to_save" in name}
    )
    if config.get("modules_to_save") or saved_whole:
        cause = f"modules_to_save={config.get('modules_to_save') or saved_whole}: whole layers trained beside LoRA"
        fix = "train without modules_to_save (keep the vocabulary: the pad token is an existing one), or merge"
        found["llama.cpp / Ollama"].append((cause, fix))
        found["vLLM"].append((cause, fix))
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    embedding = [t for t in targets if t in ("embed_tokens", "lm_head")] + (
        ["embeddings"] if any("lora_embedding_" in name for name in names) else []
    )
    if embedding:
        cause = f"LoRA on {', '.join(embedding)}"
        found["llama.cpp / Ollama"].append((cause, "target the attention and MLP layers only, or merge"))
    rank = max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])
    if rank > VLLM_DEFAULT_MAX_RANK:
        found["vLLM"].append(
            (
                f"rank {rank} > vLLM's default max_lora_rank {VLLM_DEFAULT_MAX_RANK}",
                f"start vLLM with max_lora_rank={vllm_max_lora_rank(rank)}",
            )
        )
    return found


def notes(config: dict) -> dict[str, str]:
    """What each runtime does differently but correctly (nothing to fix)."""
    said = {}
    if config.get("use_rslora"):
        r, alpha = config.get("r"), config.get("lora_alpha")
        said["llama.cpp / Ollama"] = (
            f"rsLoRA: the GGUF adapter is written with alpha {alpha}·√{r} (llama.cpp scales by alpha/r)"
        )
        said["vLLM"] = "reads use_rslora itself"
    if config.get("use_dora"):
        said["merge"] = "DoRA merges exactly (merge_and_unload)"
    return said


def where_it_runs(adapter_dir) -> list[dict]:
    """One row per runtime: ``{"runtime", "runs", "why not", "fix", "note"}``; printed as a table in notebook 06."""
    config, names = adapter_contents(adapter_dir)
    found, said = problems(config, names), notes(config)
    return [
        {
            "runtime": runtime,
            "runs": not found[runtime],
            "why not": "; ".join(cause for cause, _ in found[runtime]),
            "fix": "; ".join(dict.fromkeys(fix for _, fix in found[runtime])),
            "note": said.get(runtime, ""),
        }
        for runtime in RUNTIMES
    ]


def refuse_unless_runs(adapter_dir, runtime: str) -> tuple[dict, list[str]]:
    """Raise with each cause and its fix when ``runtime`` cannot run the adapter; return its config and tensor names."""
    config, names = adapter_contents(adapter_dir)
    found = problems(config, names)[runtime]
    if found:
        reasons = "; ".join(f"{cause} (fix: {fix})" for cause, fix in found)
        raise ValueError(f"{runtime} cannot run the adapter in {adapter_dir}: {reasons}.")
    return config, names
