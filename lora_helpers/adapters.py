"""Is this the adapter of this run, for this model? Checks of a saved adapter folder before anything loads it.

Notebooks 05 (merge) and 06 (inference) run them first: an adapter from another run, another base model or a
pickled file fails here with both names, instead of loading into a model it does not fit.
"""

from __future__ import annotations

from pathlib import Path

from lora_helpers import files, lora, models


def read_adapter_config(adapter_dir) -> dict:
    """``adapter_config.json`` of a saved adapter, or the error that says which notebook writes one."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"No adapter in {adapter_dir}: run notebook 04 (training) with this run_dir first.")
    return files.read_json(path)  # a damaged file is named


def check_adapter_weights(adapter_dir, config: dict) -> None:
    """The weights file is whole and has the rank ``adapter_config.json`` says, read from its header alone (no
    model needed): a truncated file, or weights of another run beside the config, are named here."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.exists():
        return  # check_adapter_matches_base names the missing file (and refuses a pickled .bin)
    try:
        with safe_open(weights, "pt") as f:
            ranks = {f.get_slice(key).get_shape()[0] for key in f.keys() if ".lora_A" in key}
    except Exception as error:  # safetensors' own error for a truncated or foreign file
        raise ValueError(
            f"{weights} is damaged ({type(error).__name__}: {error}): was its save interrupted? Run notebook 04 "
            "again for this run_dir (overwrite=True)."
        ) from None
    if not config.get("rank_pattern") and ranks and ranks != {config.get("r")}:
        raise ValueError(
            f"{weights} holds adapters of rank {', '.join(map(str, sorted(ranks)))}, but adapter_config.json beside "
            f"it says r={config.get('r')}: the two files come from different runs. Run notebook 04 again for this "
            "run_dir (overwrite=True)."
        )


def check_adapter_matches_base(adapter_dir, model) -> None:
    """Fail with both names when an adapter was trained for a different base model (notebooks 05 and 06).

    Also refuses an adapter saved as a pickle (``adapter_model.bin``): the course loads safetensors only.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    trained_for = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_model.safetensors. The course loads safetensors only: a pickled "
            ".bin file can run code when it is loaded. Re-save the adapter with save_pretrained()."
        )
    prefix = "base_model.model."
    layers = {name.removeprefix(prefix): module for name, module in lora.linear_layers(model).items()}
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            if ".lora_A" not in key:
                continue
            layer = key.split(".lora_A")[0].removeprefix(prefix)
            _, d_in = f.get_slice(key).get_shape()
            d_out, _ = f.get_slice(key.replace(".lora_A", ".lora_B")).get_shape()
            module = layers.get(layer)
            if module is None or (module.in_features, module.out_features) != (d_in, d_out):
                found = "no such layer" if module is None else f"{module.in_features} -> {module.out_features}"
                raise ValueError(
                    f"The adapter in {adapter_dir} was trained for {trained_for!r} and does not fit the base model "
                    f"{getattr(model, 'name_or_path', '?')!r}: layer {layer} expects {d_in} -> {d_out}, found "
                    f"{found}. Load the base model the adapter was trained on (see run_config.json)."
                )


def check_adapter_matches_settings(adapter_dir, settings) -> None:
    """Refuse an adapter that ``run_config.json`` does not describe (notebooks 05 and 06, before any model loads).

    Its own ``adapter_config.json`` must have the run's rank, alpha and target layers (when they are named), and
    be trained on a model of the run's name; the copy of the settings notebook 04 saves inside ``adapter/`` must
    equal the run's. A mismatch means the two files come from different runs.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    check_adapter_weights(adapter_dir, config)
    problems = []
    if config.get("r") != settings.lora_r:
        problems.append(f"r={config.get('r')} (run_config.json: lora_r={settings.lora_r})")
    if config.get("lora_alpha") != settings.lora_alpha:
        problems.append(f"lora_alpha={config.get('lora_alpha')} (run_config.json: {settings.lora_alpha})")
    if settings.target_modules != "all-linear":
        named = {t.strip() for t in settings.target_modules.split(",") if t.strip()}
        if set(config.get("target_modules") or []) != named:
            problems.append(f"targets {sorted(config.get('target_modules') or [])} (run_config.json: {sorted(named)})")
    base = Path(str(config.get("base_model_name_or_path", ""))).name
    if base and base != Path(models.resolve_model_path(settings.model_id)).name:
        problems.append(
            f"base model {config.get('base_model_name_or_path')!r} (run_config.json: {settings.model_id!r})"
        )
    saved = adapter_dir / "run_config.json"
    if saved.exists():
        differing = [k for k, v in files.read_json(saved).items() if getattr(settings, k, v) != v]
        if differing:
            problems.append(f"settings saved with it differ in {', '.join(sorted(differing))}")
    if problems:
        raise ValueError(
            f"The adapter in {adapter_dir} was not trained with this run's run_config.json: {'; '.join(problems)}. "
            "They come from different runs (one that failed before saving its adapter?). Run notebook 04 again "
            "for this run_dir (overwrite=True), or use the run_dir whose settings made this adapter."
        )


SOURCE_FILE = "adapter_source.json"  # in merged/ and gguf/: which adapter they were made from


def fingerprint(adapter_dir) -> str:
    """The adapter's weights file, hashed (sha256, first 16 hex digits): equal only for the same saved adapter."""
    import hashlib

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def record_source(folder, adapter_dir, **details) -> Path:
    """Write ``folder/adapter_source.json``: the fingerprint of the adapter ``folder`` was made from (notebook 05's
    merged model and GGUF files), so that notebook 06 never measures one adapter against another's merge."""
    return files.write_json(Path(folder) / SOURCE_FILE, {"adapter": fingerprint(adapter_dir), **details})


def check_made_from(folder, adapter_dir) -> None:
    """Refuse ``folder`` (``merged/``, ``gguf/``) when it records another adapter than ``adapter_dir``'s."""
    source = files.read_json(Path(folder) / SOURCE_FILE, missing={})
    current = fingerprint(adapter_dir)
    if source.get("adapter", current) != current:
        raise ValueError(
            f"{folder} was made from another adapter (fingerprint {source['adapter']}) than {adapter_dir} "
            f"({current}): notebook 04 trained again after notebook 05 made it. Run notebook 05 again for this "
            "run_dir (overwrite=True), so that the merged model and the GGUF files come from this adapter."
        )


def remove_made_from_previous(run_dir) -> list[str]:
    """After notebook 04 saved a new adapter: remove what the previous one made (merged model, GGUF files, the
    second adapter trained with the previous settings, the evaluation and its lm-evaluation-harness scores); return
    their names."""
    import shutil

    removed = []
    for name in ("merged", "gguf", "merge_check.json", "adapter_captain", "eval.json", "lm_eval.json", "lm_eval.png"):
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed
