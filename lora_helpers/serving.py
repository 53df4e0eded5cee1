"""Serve a run's adapters behind an OpenAI-compatible API: one base GGUF loaded once, each adapter a model name.

Taught in notebook 06 ("Serve the adapters"); run by ``lora-course serve --run-dir DIR [--port N]``. The server is
llama-cpp-python's own (FastAPI and uvicorn, ``pip install 'llama-cpp-python[server]'``); the course adds one thing
to it: its model switcher keeps the base model loaded and switches LoRA adapters on llama.cpp's context per request,
instead of loading a whole model per name. Model names: ``base`` (no adapter) and each adapter folder of the run
(``adapter``, ``adapter_captain``).

Files, in ``run_dir/serve/``: ``base-F16.gguf`` (the base model's original 16-bit weights, written once) and one
``NAME-F16.gguf`` LoRA file per adapter (megabytes, rewritten at every start, so they always match the adapters).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from lora_helpers import files, gguf_export, models

SERVE_DIR = "serve"
BASE_NAME = "base"
DEFAULT_PORT = 8000


def parse_adapter_options(options: list[str]) -> dict[str, Path]:
    """``serve --adapter NAME=PATH`` options as ``{name: folder}``, each folder checked to hold an adapter."""
    extra = {}
    for option in options:
        name, sep, path = option.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {option!r}: write NAME=PATH, e.g. --adapter chef=runs/chef/adapter")
        folder = Path(path).expanduser().resolve()
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"--adapter {option!r}: {folder} holds no adapter_config.json (not an adapter folder)."
            )
        extra[name] = folder
    return extra


def adapter_dirs(run_dir, extra: dict[str, Path] | None = None) -> dict[str, Path]:
    """The adapters to serve by model name: every folder of ``run_dir`` holding ``adapter_config.json`` (``adapter``
    first), then ``extra``."""
    found = {p.name: p for p in sorted(Path(run_dir).iterdir()) if (p / "adapter_config.json").is_file()}
    found = dict(sorted(found.items(), key=lambda item: item[0] != "adapter"))
    for name, folder in (extra or {}).items():
        if name in found:
            raise ValueError(f"--adapter {name}={folder}: {run_dir} already serves an adapter named {name!r}.")
        found[name] = folder
    if not found:
        raise FileNotFoundError(
            f"{run_dir} holds no adapter (a folder with adapter_config.json): run notebook 04 first."
        )
    if BASE_NAME in found:
        raise ValueError(f"{found[BASE_NAME]}: an adapter may not be named {BASE_NAME!r}, the base model's name.")
    return found


def base_model_dir(model_id: str) -> Path:
    """The base model's folder of safetensors and tokenizer files: the course's own models and a local folder as
    they are, a Hub model from the Hugging Face cache (downloaded by notebook 02, fetched now if it is not)."""
    path = Path(models.resolve_model_path(model_id))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    return Path(snapshot_download(model_id, allow_patterns=patterns))


def export_for_serving(run_dir, model_id: str, extra: dict[str, Path] | None = None) -> dict[str, Path]:
    """``{model name: GGUF file}``: the base written once to ``run_dir/serve/base-F16.gguf`` (again when another
    model made it), and each adapter (``adapter_dirs``) as a llama.cpp LoRA file beside it.

    The base must be a Llama-architecture model (``gguf_export``), and every adapter is checked first (runs in
    llama.cpp, fits the base model's layers), so a wrong one fails before the base is written or loaded.
    """
    from transformers import AutoConfig

    from lora_helpers import runtimes

    serve_dir = Path(run_dir) / SERVE_DIR
    base_dir = base_model_dir(model_id)
    kind = AutoConfig.from_pretrained(base_dir).model_type
    if kind != "llama":  # the course's GGUF writer; llama.cpp's own converters cover the rest
        raise ValueError(gguf_export.UNSUPPORTED.format(kind=kind))
    adapters = adapter_dirs(run_dir, extra)
    for adapter in adapters.values():
        runtimes.refuse_unless_runs(adapter, "llama.cpp / Ollama")
        check_fits_base(adapter, base_dir, model_id)
    serve_dir.mkdir(exist_ok=True)
    base = serve_dir / "base-F16.gguf"
    record = serve_dir / "base_source.json"
    if not base.exists() or files.read_json(record, missing={}).get("model_id") != model_id:
        weights = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
        files.check_free_space(serve_dir, weights, "the base model's F16 GGUF file")
        gguf_export.export_gguf(base_dir, base, "F16")
        files.write_json(record, {"model_id": model_id})
    exported = {BASE_NAME: base}
    for name, adapter in adapters.items():
        exported[name] = gguf_export.export_adapter_gguf(adapter, serve_dir / f"{name}-F16.gguf", base_dir)
    return exported


def check_fits_base(adapter_dir, base_dir, model_id: str) -> None:
    """Refuse an adapter trained for another model: another base model name in its config, or layers of other shapes."""
    from safetensors import safe_open
    from transformers import AutoConfig

    trained_for = files.read_json(Path(adapter_dir) / "adapter_config.json").get("base_model_name_or_path") or ""
    if trained_for and Path(trained_for).name != Path(models.resolve_model_path(model_id)).name:
        raise ValueError(
            f"The adapter in {adapter_dir} was trained for {trained_for!r}, which does not fit the run's base model "
            f"{model_id!r}. Serve it with the base model it was trained on (the run_dir of its own run)."
        )
    config = AutoConfig.from_pretrained(base_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim
    q = config.num_attention_heads * head_dim
    shapes = {
        "q_proj": (config.hidden_size, q),
        "k_proj": (config.hidden_size, kv),
        "v_proj": (config.hidden_size, kv),
        "o_proj": (q, config.hidden_size),
        "gate_proj": (config.hidden_size, config.intermediate_size),
        "up_proj": (config.hidden_size, config.intermediate_size),
        "down_proj": (config.intermediate_size, config.hidden_size),
    }
    with safe_open(Path(adapter_dir) / "adapter_model.safetensors", "pt") as f:
        for key in (k for k in f.keys() if ".lora_A" in k):
            layer = key.split(".lora_A")[0]
            found = (f.get_slice(key).get_shape()[1], f.get_slice(key.replace(".lora_A", ".lora_B")).get_shape()[0])
            index = int(layer.split(".layers.")[1].split(".")[0]) if ".layers." in layer else -1
            expected = shapes.get(layer.rsplit(".", 1)[-1])
            if expected != found or index >= config.num_hidden_layers:
                raise ValueError(
                    f"The adapter in {adapter_dir} does not fit the base model in {base_dir}: its layer {layer} "
                    f"maps {found[0]} -> {found[1]}, the base's {expected or 'has no such layer'}"
                    f"{' (only ' + str(config.num_hidden_layers) + ' layers)' if index >= config.num_hidden_layers else ''}. "
                    "Serve it with the base model it was trained on."
                )


def check_port_free(host: str, port: int) -> None:
    """Fail before any model loads when ``host:port`` is taken, naming it and the way out."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(
                f"Cannot serve on {host}:{port}: {error.strerror}. Another server is using the port: stop it, or "
                "choose another with --port."
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for tests and notebook 06's short-lived server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def load_adapter(llm, path):
    """A llama.cpp LoRA file loaded over ``llm``'s model (not yet applied): llama.cpp's ``llama_adapter_lora_init``."""
    import llama_cpp

    loaded = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
    if not loaded:
        raise ValueError(f"llama.cpp could not load the adapter {path} over {llm.model_path}.")
    return loaded


def use_adapters(llm, loaded: list, scale: float = 1.0) -> None:
    """Apply these loaded adapters (none: the plain base) to ``llm``'s context, and forget what it had computed.

    llama.cpp adds each adapter's ``scale · alpha/r · B·A`` at run time, so the base stays memory-mapped and
    unchanged: switching adapters costs nothing. (llama-cpp-python's own ``Llama(lora_path=...)`` turns memory
    mapping off, which would read a 7B base into RAM whole.)
    """
    import ctypes

    import llama_cpp

    handles = (llama_cpp.llama_adapter_lora_p_ctypes * max(len(loaded), 1))(*loaded)
    scales = (ctypes.c_float * max(len(loaded), 1))(*([scale] * len(loaded)))
    if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, handles, len(loaded), scales):
        raise RuntimeError(f"llama.cpp could not apply {len(loaded)} adapter(s) to {llm.model_path}.")
    llm.reset()  # what is cached was computed with the previous adapters


def adapter_proxy(base_proxy, adapters: dict[str, Path]):
    """llama-cpp-python's model switcher (``LlamaProxy``), made to keep ``base_proxy``'s loaded base model and to
    switch adapters on its context: a request for ``adapter_captain`` sets that LoRA (scale 1), ``base`` none."""
    import llama_cpp
    from fastapi import HTTPException
    from llama_cpp.server.model import LlamaProxy

    class AdapterProxy(LlamaProxy):
        def __init__(self):  # no super().__init__(): it would load a model per name
            self._current_model = base_proxy._current_model
            settings = base_proxy._default_model_settings
            self._default_model_settings, self._default_model_alias = settings, BASE_NAME
            self._model_settings_dict = {BASE_NAME: settings} | {
                name: settings.model_copy(update={"model_alias": name, "lora_path": str(path)})
                for name, path in adapters.items()
            }
            self._loaded = {name: load_adapter(self._current_model, path) for name, path in adapters.items()}
            self._current_model_alias = BASE_NAME

        def __call__(self, model: str | None = None):
            model = model or BASE_NAME
            if model not in self._model_settings_dict:
                raise HTTPException(404, f"No model {model!r} here; ask for one of {', '.join(self)}.")
            if model != self._current_model_alias:
                use_adapters(self._current_model, [self._loaded[model]] if model in self._loaded else [])
                self._current_model_alias = model
            return self._current_model

        def free(self):
            for loaded in self._loaded.values():
                llama_cpp.llama_adapter_lora_free(loaded)
            self._loaded = {}
            super().free()

    return AdapterProxy()


def context_length(path) -> int:
    """The context length a GGUF model file was trained with (``llama.context_length``), read from its header."""
    import gguf

    return int(gguf.GGUFReader(path).fields["llama.context_length"].contents())


def create_app(gguf_files: dict[str, Path], host: str = "127.0.0.1", port: int = DEFAULT_PORT, n_ctx: int = 4096):
    """llama-cpp-python's FastAPI app over ``gguf_files[base]``, with the adapters as further model names.

    ``n_ctx`` tokens of context (prompt and answer) per request, at most the model's own: llama.cpp reserves their
    key-value cache up front (a 4096-token cache of an 8B Llama-3 in F16 is 0.5 GB).
    """
    n_ctx = min(n_ctx, context_length(gguf_files[BASE_NAME]))
    import llama_cpp.server.app as server
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    base = ModelSettings(model=str(gguf_files[BASE_NAME]), model_alias=BASE_NAME, n_ctx=n_ctx, verbose=False)
    with without_weight_repacking():  # as open_gguf loads: no crash, no warning per adapted tensor
        app = server.create_app(server_settings=ServerSettings(host=host, port=port), model_settings=[base])
    adapters = {name: path for name, path in gguf_files.items() if name != BASE_NAME}
    server._llama_proxy = adapter_proxy(server._llama_proxy, adapters)  # what server.set_llama_proxy sets
    return app


def serve(run_dir, host: str = "127.0.0.1", port: int = DEFAULT_PORT, extra: dict[str, Path] | None = None) -> None:
    """``lora-course serve``: check, export, load, then answer until Ctrl-C."""
    import uvicorn

    from lora_helpers import presets

    run_dir = Path(run_dir).expanduser().resolve()
    settings = presets.load_run_settings(run_dir)  # names a missing or damaged run_config.json
    check_port_free(host, port)
    gguf_files = export_for_serving(run_dir, settings.model_id, extra)
    names = ", ".join(gguf_files)
    # flushed: through a pipe (notebook 06, the tests) print's output would wait in a buffer until the server stops
    print(
        f"Serving {names} at http://{host}:{port}/v1 (OpenAI-compatible; model= one of those names). Ctrl-C stops.",
        flush=True,
    )
    uvicorn.run(create_app(gguf_files, host, port), host=host, port=port, log_level="warning")


@contextlib.contextmanager
def without_weight_repacking():
    """llama.cpp models loaded inside this block keep their weights as the file has them: repacking for the CPU's
    AMX / AVX512 kernels is turned off. llama-cpp-python 0.3.36's repacked Q8_0 kernels crash (segmentation fault)
    on the tiny models' 128-wide rows on CPUs with AMX, and a LoRA adapter over repacked weights makes llama.cpp
    print a warning per adapted tensor ("cannot use buft 'AMX', fallback to CPU"; llama-cpp-python shows llama.cpp's
    warnings even with ``verbose=False``). The files are fine; repacking only makes CPU inference faster."""
    import llama_cpp.llama as binding

    default = binding.llama_cpp.llama_model_default_params

    def without_repacking():
        params = default()
        params.use_extra_bufts = False
        return params

    binding.llama_cpp.llama_model_default_params = without_repacking
    try:
        yield
    finally:
        binding.llama_cpp.llama_model_default_params = default


def open_gguf(path, n_ctx: int = 1024):
    """llama.cpp (``llama_cpp.Llama``) on a GGUF file, logits kept for every position (notebook 06, tests), with
    ``n_ctx`` tokens of context at most (never more than the model's own), loaded ``without_weight_repacking``."""
    import llama_cpp

    with without_weight_repacking():
        return llama_cpp.Llama(str(path), logits_all=True, n_ctx=min(n_ctx, context_length(path)), verbose=False)


def llama_cpp_answers(path, prompts: list[list[int]], max_new_tokens: int, lora_path=None) -> tuple[list[str], list]:
    """Greedy answers and the logits of each prompt (token ids) in llama.cpp, shaped as ``evaluate.prompt_logits``'s
    (notebook 06's table of runtimes compares them)."""
    import torch

    llm = open_gguf(path)
    answers, logits = [], []
    try:
        if lora_path:
            adapter = load_adapter(llm, lora_path)
            use_adapters(llm, [adapter])
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            logits.append(torch.tensor(llm.scores[: len(ids)]).unsqueeze(0))
            reply = llm(ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
            answers.append(reply["choices"][0]["text"].strip())
    finally:
        llm.close()
    return answers, logits


def wait_until_serving(server, client, timeout_s: float = 300) -> str:
    """Wait for a started ``lora-course serve`` process (``subprocess.Popen``, text output piped) to answer
    ``client`` (an ``openai.OpenAI`` for its address); return what it printed. A server that exits is reported with
    its output."""
    import time

    said = server.stdout.readline()  # "Serving ..." once the files are written, before the model loads
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"lora-course serve exited with {server.returncode}:\n{said}{server.stdout.read()}")
        try:
            client.models.list()
            return said.strip()
        except Exception:  # openai.APIConnectionError until uvicorn listens
            time.sleep(0.5)
    server.kill()
    raise TimeoutError(f"lora-course serve did not answer within {timeout_s:.0f} s; it printed:\n{said}")


def missing_packages() -> list[str]:
    """What ``pip install`` still needs for the server and its client (notebook 06 says it instead of failing)."""
    import importlib.util

    wanted = {
        "llama_cpp": "llama-cpp-python[server]",
        "uvicorn": "llama-cpp-python[server]",
        "fastapi": "llama-cpp-python[server]",
        "openai": "openai",
    }
    return list(
        dict.fromkeys(package for module, package in wanted.items() if importlib.util.find_spec(module) is None)
    )
