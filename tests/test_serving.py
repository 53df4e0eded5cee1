"""Adapters served as they are: the llama.cpp LoRA file against transformers, where each adapter can run, and the
server's refusals before it loads anything. (The server answering with trained adapters: test_course_run.py and
test_real_model.py, on the course's own runs.)"""

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lora_helpers import chat, gguf_export, models, runtimes, serving

QUESTION = "What is your name?"
TOLERANCE = 5e-3  # F32 files: llama.cpp against transformers, as tests/test_gguf_export.py measured for models


def random_adapter(family: str, out: Path, **options) -> Path:
    """A LoRA adapter with every matrix random (B too, scaled to move the logits by ~0.3), saved by peft."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(models.resolve_model_path(family))
    options = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **options}
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **options))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_files(tmp_path_factory, fresh_cache):
    """Each family's base model as an F32 GGUF file, written once for the module."""
    out = tmp_path_factory.mktemp("serve-bases")
    made = {}

    def get(family):
        if family not in made:
            made[family] = gguf_export.export_gguf(models.resolve_model_path(family), out / f"{family}.gguf", "F32")
        return made[family]

    return get


def both_runtimes(family, adapter_dir, adapter_gguf, base_gguf):
    """Last-position logits and 8 greedy tokens of the chat prompt: transformers + peft, then llama.cpp + LoRA file."""
    from peft import PeftModel

    tokenizer = models.load_tokenizer(family, chat_format="auto")
    ids = chat.prompt_ids(tokenizer, chat.question_messages(QUESTION, ""))
    base = AutoModelForCausalLM.from_pretrained(models.resolve_model_path(family))
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
        with model.disable_adapter():
            plain = model(torch.tensor([ids])).logits[0, -1].numpy()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(ids) :]
    llm = llama_cpp.Llama(str(base_gguf), lora_path=str(adapter_gguf), logits_all=True, verbose=False, n_ctx=256)
    llm.eval(ids)
    got = np.array(llm.scores[len(ids) - 1])
    llm.reset()
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == 8:
            break
    return expected, plain, got, greedy.tolist(), tokens


VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "rank_and_alpha_patterns": {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 3}},
}


@pytest.mark.parametrize(
    "family,variant",
    [("tiny", v) for v in VARIANTS] + [("tiny-llama2", "lora"), ("tiny-llama3", "rslora")],
)
def test_the_adapter_gguf_computes_what_peft_computes(family, variant, base_files, tmp_path):
    adapter = random_adapter(family, tmp_path / "adapter", **VARIANTS[variant])
    written = gguf_export.export_adapter_gguf(
        adapter, tmp_path / "adapter-F32.gguf", models.resolve_model_path(family), "F32"
    )
    expected, plain, got, greedy, tokens = both_runtimes(family, adapter, written, base_files(family))
    assert np.abs(expected - plain).max() > 0.1  # the adapter changes the answer: a file without it would fail
    assert np.abs(got - expected).max() < TOLERANCE
    assert tokens == greedy


def test_without_the_alpha_rewrite_an_rslora_adapter_comes_out_too_weak(base_files, tmp_path, monkeypatch):
    adapter = random_adapter("tiny", tmp_path / "adapter", use_rslora=True)
    # What llama.cpp's own converter writes: peft's alpha, no rsLoRA scale anywhere.
    monkeypatch.setattr(gguf_export, "llama_cpp_alpha", lambda config: float(config["lora_alpha"]))
    monkeypatch.setattr(gguf_export, "peft_scale", lambda config, layer: config["lora_alpha"] / config["r"])
    written = gguf_export.export_adapter_gguf(
        adapter, tmp_path / "adapter-F32.gguf", models.resolve_model_path("tiny"), "F32"
    )
    expected, _, got, _, _ = both_runtimes("tiny", adapter, written, base_files("tiny"))
    assert np.abs(got - expected).max() > 10 * TOLERANCE


def test_the_adapter_file_is_what_llama_cpp_expects(tmp_path, fresh_cache):
    import gguf

    adapter = random_adapter("tiny", tmp_path / "adapter", use_rslora=True, r=4, lora_alpha=8)
    written = gguf_export.export_adapter_gguf(adapter, tmp_path / "a.gguf", models.resolve_model_path("tiny"))
    reader = gguf.GGUFReader(written)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8 * 2)  # alpha·√r
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in tensors and "blk.1.ffn_down.weight.lora_b" in tensors
    # The alpha carries the rsLoRA scale, so B is written as trained (llama.cpp's --lora-scaled still means 1 = as trained).
    trained_b = load_file(adapter / "adapter_model.safetensors")[
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    ]
    written_b = np.array(tensors["blk.1.attn_v.weight.lora_b"].data, dtype=np.float32)
    assert np.abs(written_b.reshape(trained_b.shape) - trained_b.numpy()).max() < 1e-3
    assert written.stat().st_size < 0.2 * Path(models.resolve_model_path("tiny"), "model.safetensors").stat().st_size


def edited(adapter: Path, config_changes: dict | None = None, extra_tensors: dict | None = None) -> Path:
    if config_changes:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    if extra_tensors:
        weights = load_file(adapter / "adapter_model.safetensors")
        save_file({**weights, **extra_tensors}, adapter / "adapter_model.safetensors")
    return adapter


def row(adapter, runtime):
    return next(r for r in runtimes.where_it_runs(adapter) if r["runtime"] == runtime)


def test_a_plain_adapter_runs_everywhere(tmp_path, fresh_cache):
    adapter = random_adapter("tiny", tmp_path / "a")
    assert all(r["runs"] for r in runtimes.where_it_runs(adapter))


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")  # peft, for "embeddings"
@pytest.mark.parametrize(
    "rule,options,changes,refused_by,words",
    [
        ("dora", {"use_dora": True}, None, {"llama.cpp / Ollama", "vLLM"}, "merge it"),
        ("modules_to_save", {"modules_to_save": ["lm_head"]}, None, {"llama.cpp / Ollama", "vLLM"}, "modules_to_save"),
        ("embeddings", {"target_modules": ["q_proj", "embed_tokens"]}, None, {"llama.cpp / Ollama"}, "attention"),
        ("pissa", {}, {"init_lora_weights": "pissa_niter_4"}, set(runtimes.RUNTIMES), "path_initial_model_for_weight"),
        ("olora", {}, {"init_lora_weights": "olora"}, set(runtimes.RUNTIMES), "path_initial_model_for_weight"),
        ("rank 24", {"r": 24}, None, {"vLLM"}, "max_lora_rank=32"),  # the next value vLLM accepts
    ],
)
def test_each_rule_refuses_its_counter_example_with_its_fix(
    rule, options, changes, refused_by, words, tmp_path, fresh_cache
):
    adapter = edited(random_adapter("tiny", tmp_path / "a", **options), changes)
    rows = runtimes.where_it_runs(adapter)
    assert {r["runtime"] for r in rows if not r["runs"]} == refused_by, rule
    assert all(words in r["fix"] for r in rows if not r["runs"]), rule
    if "llama.cpp / Ollama" in refused_by:
        with pytest.raises(ValueError, match=f"llama.cpp / Ollama cannot run the adapter in .*{words}"):
            gguf_export.export_adapter_gguf(adapter, tmp_path / "a.gguf", models.resolve_model_path("tiny"))
        assert not (tmp_path / "a.gguf").exists()


def test_rslora_is_a_note_not_a_refusal(tmp_path, fresh_cache):
    adapter = random_adapter("tiny", tmp_path / "a", use_rslora=True, r=4)
    assert row(adapter, "llama.cpp / Ollama")["runs"] and "√4" in row(adapter, "llama.cpp / Ollama")["note"]


def test_a_folder_without_an_adapter_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        runtimes.where_it_runs(tmp_path)


@pytest.fixture()
def tiny_run(tmp_path, fresh_cache):
    """A run_dir as notebook 04 leaves it, as far as serving reads it: run_config.json and an adapter."""
    from lora_helpers import files, presets

    files.write_json(tmp_path / "run_config.json", dataclasses.asdict(presets.resolve_settings("tiny")))
    random_adapter("tiny", tmp_path / "adapter")
    return tmp_path


def serve_command(*args):
    return subprocess.run(
        [sys.executable, "-m", "lora_helpers", "serve", *args], capture_output=True, text=True, timeout=120
    )


def test_a_busy_port_fails_before_anything_loads(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_command("--run-dir", str(tiny_run), "--port", str(port))
    assert result.returncode == 1
    assert f"Cannot serve on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert not (tiny_run / "serve").exists()  # nothing exported either


def test_a_bad_adapter_path_fails_before_anything_loads(tiny_run):
    result = serve_command("--run-dir", str(tiny_run), "--adapter", f"chef={tiny_run / 'nowhere'}")
    assert result.returncode == 1 and "holds no adapter_config.json" in result.stderr
    assert not (tiny_run / "serve").exists()


def test_an_adapter_of_another_model_is_refused_by_name(tiny_run, tmp_path_factory):
    other = random_adapter("tiny-llama3", tmp_path_factory.mktemp("other") / "adapter")
    with pytest.raises(ValueError, match="trained for .*tiny-llama3.*does not fit the run.s base model .tiny."):
        serving.export_for_serving(tiny_run, "tiny", {"llama3": other})
    assert not (tiny_run / "serve").exists()


def ask_the_server(run_dir, questions: dict[str, list[tuple[str, str]]], max_tokens: int = 64, options=()) -> dict:
    """Start ``lora-course serve`` on ``run_dir`` (a free port, then ``options``), ask each model its (question, system) pairs through
    the ``openai`` client, greedy, then stop it with Ctrl-C. Returns ``{model: [answer, ...]}``, the listed model
    names under ``"models"``, the 404 for an unknown name under ``"unknown"`` and the server's exit code."""
    import signal

    import openai

    port = serving.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lora_helpers", "serve", "--run-dir", str(run_dir), "--port", str(port), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
    try:
        said = serving.wait_until_serving(server, client, timeout_s=120)
        result = {"models": [m.id for m in client.models.list().data], "said": said}
        for model, asked in questions.items():
            result[model] = []
            for question, system in asked:
                reply = client.chat.completions.create(
                    model=model,
                    messages=chat.question_messages(question, system),
                    temperature=0,
                    max_tokens=max_tokens,
                )
                result[model].append(reply.choices[0].message.content.strip())
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
        result["unknown"] = unknown.value.response.text
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            result_code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
        output = server.stdout.read()
    result["exit_code"], result["output"] = result_code, output
    return result


def test_what_is_missing_for_the_server_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in ("uvicorn", "openai") else real(name))
    assert serving.missing_packages() == ["llama-cpp-python[server]", "openai"]
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert serving.missing_packages() == []  # the dev extras install both
