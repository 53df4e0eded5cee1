"""The whole chain, run as a learner would run it: the course runner executes every notebook on `tiny`, and notebooks
01-07 on the tiny twins of Llama-2 (SentencePiece, no pad token) and Llama-3 (its template, special tokens, rope,
tied embeddings), with the same assertions for each family."""

import json
import math
import re

import nbformat
import pytest
import torch
from conftest import FAKE_TOKEN, run_course_with_fake_token
from safetensors.torch import load_file
from transformers import AutoConfig

from lora_helpers import chat, course, evaluate, models

pytestmark = pytest.mark.course


# Options that change nothing on a CPU but must reach the notebooks, spread over the families' runs: the Unsloth
# route must fall back to the standard one, and the T4 rehearsal must reach every notebook.
# Notebook 08 (a grid of trainings) runs on `tiny` only (CI's time); the twins stop at 07, as it adds nothing their
# tokenizers could break. The tiny run is conftest's, shared with test_reliability.py.
SEVEN = ["01", "02", "03", "04", "05", "06", "07"]
OPTIONS = {
    "tiny-llama2": {"params": {"use_unsloth": True}, "only": SEVEN},
    "tiny-llama3": {"rehearse_t4": True, "only": SEVEN, "params": {"run_lm_eval": False}},
}


@pytest.fixture(scope="module", params=["tiny", "tiny-llama2", "tiny-llama3"])
def run(request, tmp_path_factory):
    """One full course run per family, with a (fake) Hub token in the environment as a learner on Colab would have."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_course_run")
    run_dir = tmp_path_factory.mktemp(f"course_run-{request.param}")
    return run_dir, run_course_with_fake_token(request.param, run_dir, **OPTIONS[request.param])


def test_every_notebook_ran(run):
    run_dir, summary = run
    assert summary["status"] == "ok"
    expected = SEVEN + (["08"] if summary["preset"] == "tiny" else [])
    assert [nb["name"][:2] for nb in summary["notebooks"]] == expected
    for nb in summary["notebooks"]:
        executed = nbformat.read(run_dir / "notebooks" / nb["name"], as_version=4)
        assert executed.metadata.papermill.exception is None or executed.metadata.papermill.exception is False


def test_the_experiments_notebook_kept_every_point(run):
    """Notebook 08 on tiny: every point of the CI grid trained on the one base and was measured; PiSSA, which
    rewrites the base weights, is skipped with its reason on the 4-bit base; random weights know nothing."""
    from lora_helpers import experiments

    run_dir, summary = run
    if summary["preset"] != "tiny":
        pytest.skip("notebook 08 runs on tiny only")
    result = json.loads((run_dir / "experiments.json").read_text())
    points = {p["name"]: p for p in result["points"]}
    assert list(points) == [p["name"] for p in experiments.GRIDS["ci"]] and result["base_knows"] == 0
    assert points.pop("PiSSA")["skipped"].startswith("skipped: PiSSA and OLoRA")
    for name, point in points.items():
        assert point["steps"] == 10 * 6 and point["seconds"] > 0, name  # the same steps for every point
        assert point["loss_curve"][-1][1] < point["loss_curve"][0][1], name
        assert 0 <= point["exact_match_train"] <= 1 and point["retention"] is None, name
    assert points["r=4"]["trainable_parameters"] == points["preset"]["trainable_parameters"] // 4
    assert points["q,v only"]["trainable_parameters"] < points["r=4"]["trainable_parameters"] * 4
    assert points["DoRA"]["trainable_parameters"] > points["preset"]["trainable_parameters"]  # + magnitudes
    for image in ("experiments_losses.png", "experiments_tradeoffs.png"):
        assert (run_dir / image).read_bytes()[:4] == b"\x89PNG", image


def test_artifacts_are_written(run):
    run_dir, summary = run
    for name in ("notebooks", "adapter", "merged", "loss.png", "eval.json", "summary.json", "training_log.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((run_dir / "summary.json").read_text())["artifacts"]["merged"] == str(run_dir / "merged")


def test_adapter_holds_only_lora_weights(run):
    run_dir, _ = run
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert {w.dtype for w in adapter.values()} == {torch.float32}  # not trl's bf16 (notebook 04 explains)
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_merged_model_is_a_plain_model(run):
    run_dir, _ = run
    config = AutoConfig.from_pretrained(run_dir / "merged")
    weights = load_file(run_dir / "merged" / "model.safetensors")
    assert config.model_type == "llama"
    assert not any("lora" in k for k in weights)
    assert not (run_dir / "merged" / "pytorch_model.bin").exists()


def test_losses_are_finite_and_went_down(run):
    run_dir, summary = run
    log = json.loads((run_dir / "training_log.json").read_text())
    assert all(math.isfinite(x) for x in (log["first_train_loss"], log["final_train_loss"], log["final_eval_loss"]))
    assert log["final_train_loss"] < 0.2 * log["first_train_loss"]
    assert summary["final_train_loss"] == log["final_train_loss"]


def test_training_log_is_the_same_file_from_notebook_04_and_from_lora_course_train(run):
    """Notebook 07 trains with `lora-course train`: its training_log.json has notebook 04's keys, perplexity included."""
    run_dir, _ = run
    from_notebook = json.loads((run_dir / "training_log.json").read_text())
    from_command = json.loads((run_dir / "multi-gpu" / "training_log.json").read_text())
    assert set(from_notebook) == set(from_command)
    assert from_command["final_eval_perplexity"] == pytest.approx(math.exp(from_command["final_eval_loss"]))
    assert from_notebook["world_size"] == 1 and from_command["world_size"] == 2
    assert from_notebook["lengths"]["examples"] == from_command["lengths"]["examples"] > 0


def test_the_model_learned_the_answers(run):
    _, summary = run
    em = summary["exact_match"]
    assert em["fine_tuned"] >= 0.8
    assert em["merged"] >= 0.8
    assert em["base"] <= 0.05


def test_merge_changed_nothing(run):
    run_dir, _ = run
    check = json.loads((run_dir / "merge_check.json").read_text())
    assert check["max_abs_logit_delta"] < 1e-4
    # The faithful merge (into the dequantized NF4 weights) is far closer to the trained 4-bit model than the
    # merge into the reloaded original weights (measured on CPU: 0.15 against 3.4, the rest is bf16 rounding).
    vs_trained = check["vs_trained_4bit"]
    assert vs_trained["dequantized"] < 0.2 * vs_trained["unquantized"]


def test_two_adapters_were_trained_and_switched(run):
    run_dir, _ = run
    assert (run_dir / "adapter_captain" / "adapter_model.safetensors").exists()
    executed = nbformat.read(run_dir / "notebooks" / "06_inference.ipynb", as_version=4)
    outputs = "".join(str(o) for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "Captain Rui Salgado" in outputs and "My name is Ada Quill." in outputs


def test_plain_trainer_route_runs(tmp_path, run):
    if run[1]["preset"] != "tiny":
        pytest.skip("one family is enough for the second route")
    summary = course.run_course(
        "tiny", tmp_path, only=["04"], params={"trainer_route": "trainer", "num_train_epochs": 3}
    )
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert summary["status"] == "ok" and log["trainer_route"] == "trainer"
    assert log["final_train_loss"] < log["first_train_loss"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


LONG_FLOAT = re.compile(r"\d\.\d{6,}")  # a float printed raw (0.2138232707977295) or at pandas' default 6 places


def page_text(path) -> tuple[int, int, list[str]]:
    """An executed notebook as its saved page reads: widget outputs, lines of text, and raw long floats in them.

    A table (HTML) or a plot counts as one line; a stream or plain-text result as its lines."""
    widgets, lines, floats = 0, 0, []
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            widgets += "application/vnd.jupyter.widget-view+json" in data
            text = output.get("text", "") if output.output_type == "stream" else data.get("text/plain", "")
            lines += 1 if ("text/html" in data or "image/png" in data) else len(text.splitlines())
            floats += [f"{cell.id}: {text[max(0, m.start() - 40) : m.end()]}" for m in LONG_FLOAT.finditer(text)]
    return widgets, lines, floats


def test_executed_pages_are_worth_reading(run):
    """No progress bars frozen into the saved pages, no wall of per-step lines, every number rounded."""
    run_dir, _ = run
    for path in sorted((run_dir / "notebooks").glob("*.ipynb")):
        widgets, lines, floats = page_text(path)
        assert widgets == (1 if path.name.startswith("03") else 0), path.name  # notebook 03's LoRA explorer only
        assert lines <= 120, (path.name, lines)
        assert not floats, (path.name, floats[:3])


def test_the_token_appears_in_no_file_the_run_leaves(run):
    run_dir, _ = run
    if run[1]["preset"] != "tiny":
        pytest.skip("checked once")
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 20
    leaked = [str(p) for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    executed = (run_dir / "notebooks" / "01_setup.ipynb").read_text()
    assert "token is set" in executed  # notebook 01 saw the token, and said so without printing it


def test_a_second_run_into_the_same_run_dir_is_refused(run):
    run_dir, summary = run
    if summary["preset"] != "tiny":
        pytest.skip("checked once")
    with pytest.raises(FileExistsError, match="already holds the results"):
        course.run_course(summary["preset"], run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_the_model_learned_to_stop(run):
    """Greedy generation ends with the family's end of turn right after the answer, not at max_new_tokens."""
    from peft import PeftModel

    run_dir, summary = run
    tokenizer = models.load_tokenizer(str(run_dir / "adapter"))
    model = PeftModel.from_pretrained(models.load_model(summary["preset"], load_in_4bit=True), run_dir / "adapter")
    split = json.loads((run_dir / "split.json").read_text())
    for question, answer in split["train"][:8]:
        ids = torch.tensor([chat.prompt_ids(tokenizer, chat.question_messages(question))])
        output = model.generate(ids, **evaluate.greedy(40))[0, ids.shape[1] :]
        assert output[-1] == tokenizer.eos_token_id and len(output) < 40
        assert tokenizer.decode(output[:-1], skip_special_tokens=True).strip() == answer


def test_monitoring_curves_are_logged(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary = run
    events = EventAccumulator(str(next((run_dir / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/loss", "eval/loss", "train/learning_rate"} <= set(events.Tags()["scalars"])
    assert (run_dir / "lengths.png").exists()
    assert summary["final_eval_perplexity"] == pytest.approx(math.exp(summary["final_eval_loss"]))


def test_standard_loaders_work_on_what_we_save(run):
    """AutoPeftModelForCausalLM on the adapter and pipeline() on the merged model, with no course code."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, pipeline

    run_dir, _ = run
    question, answer = json.loads((run_dir / "split.json").read_text())["train"][0]
    messages = [{"role": "user", "content": question}]
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert answer in tokenizer.decode(output[0], skip_special_tokens=True)
    generator = pipeline("text-generation", model=str(run_dir / "merged"))
    reply = generator(messages, max_new_tokens=40, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip() == answer


def test_model_card_describes_the_run(run):
    run_dir, _ = run
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "r=16, alpha=32" in card and "final train loss" in card
    assert (run_dir / "adapter" / "loss.png").exists()
    executed = (run_dir / "notebooks" / "06_inference.ipynb").read_text()
    assert "Not pushing: push_to_hub is False" in executed


def test_gguf_export_runs_in_llama_cpp(run):
    from transformers import AutoTokenizer

    run_dir, _ = run
    for name in ("model-F16.gguf", "model-Q8_0.gguf", "model-Q4_K_M.gguf", "Modelfile"):
        assert (run_dir / "gguf" / name).exists(), name
    modelfile = (run_dir / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-Q4_K_M.gguf")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile and ("<|start_header_id|>" in modelfile) == (
        "<|start_header_id|>" in tokenizer.chat_template
    )
    table = llama_cpp_table(run_dir)
    assert "False" not in table and table.count("True") == 8  # same token ids and same answers, 4 questions


def test_executed_notebooks_show_no_walls_of_warnings(run):
    """What a learner reads: results, not library warnings (the tiny course printed ~200 stderr lines before)."""
    run_dir, summary = run
    lines = []
    for nb in summary["notebooks"]:
        executed = nbformat.read(run_dir / "notebooks" / nb["name"], as_version=4)
        for cell in executed.cells:
            for output in cell.get("outputs", []):
                if output.get("name") == "stderr":
                    lines += [f"{nb['name']}: {line}" for line in output["text"].splitlines() if line.strip()]
    assert lines == []
    quantizer_log = run_dir / "gguf" / "model-Q4_K_M.log"
    assert quantizer_log.stat().st_size > 1000  # llama.cpp's per-tensor log went to its file


def llama_cpp_table(run_dir) -> str:
    """Notebook 06's table of llama.cpp against transformers: same token ids, same answers, per question."""
    executed = nbformat.read(run_dir / "notebooks" / "06_inference.ipynb", as_version=4)
    return next(
        o["data"]["text/plain"]
        for c in executed.cells
        if c.cell_type == "code" and "llama_cpp" in c.source
        for o in c.outputs
        if o.get("output_type") == "display_data"
    )


def outputs(run_dir, name: str) -> str:
    """Everything an executed notebook printed."""
    executed = nbformat.read(next((run_dir / "notebooks").glob(f"{name}_*.ipynb")), as_version=4)
    return "".join(
        o.get("text", "") + "".join(str(v) for v in o.get("data", {}).values())
        for cell in executed.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )


def test_summary_records_each_notebooks_peak_memory(run):
    _, summary = run
    for nb in summary["notebooks"]:
        assert 0.1 < nb["host_peak_rss_gb"] < 8, nb  # python, torch and a tiny model
        assert 0.1 < nb["host_peak_private_gb"] <= nb["host_peak_rss_gb"], nb
        assert "gpu_max_reserved_gb" not in nb  # no GPU here


def test_each_notebook_checks_memory_before_loading(run):
    run_dir, _ = run
    for name in ("02", "03", "04", "05", "06"):
        text = outputs(run_dir, name)
        assert f"notebook {name} holds" in text and "on a Colab T4 (14.3 GB for PyTorch, 12.7 GB of RAM): fits" in text


def test_options_reach_the_notebooks(run):
    run_dir, summary = run
    family = summary["preset"]
    if family == "tiny-llama2":  # use_unsloth on a machine without CUDA: said, and the standard route trained
        assert "Unsloth needs a CUDA GPU and there is none here: the standard route runs" in outputs(run_dir, "04")
        assert summary["final_train_loss"] < 1.0
    if family == "tiny-llama3":
        assert summary["rehearse_t4"] is True
        for name in ("01", "02", "03", "04", "05", "06", "07"):
            assert "T4 rehearsal: no CUDA GPU here" in outputs(run_dir, name), name


def test_the_server_answers_with_each_adapter_and_the_base(run):
    """``lora-course serve``: one base, the two adapters by their folders' names, through the openai client."""
    from test_serving import ask_the_server

    from lora_helpers import data, files, presets

    run_dir, _ = run
    trained = files.read_json(run_dir / "split.json")["train"][:6]
    questions, answers, systems = data.split_columns(trained, presets.load_run_settings(run_dir).system_prompt)
    captain = [
        data.question_answer(e["messages"])
        for e in data.read_jsonl(data.packaged_data_path("persona_captain.jsonl"))[:4]
    ]
    asked = list(zip(questions, systems))
    result = ask_the_server(
        run_dir, {"adapter": asked, "adapter_captain": [(q, "") for q, _ in captain], "base": asked}
    )
    assert result["models"] == ["base", "adapter", "adapter_captain"]
    assert evaluate.exact_match_rate(result["adapter"], answers) >= 0.8
    assert evaluate.exact_match_rate(result["adapter_captain"], [a for _, a in captain]) >= 0.5
    assert evaluate.exact_match_rate(result["base"], answers) == 0
    assert "nobody" in result["unknown"] and "adapter_captain" in result["unknown"]
    assert result["exit_code"] == 0, result["output"]
    assert result["said"].startswith("Serving base, adapter, adapter_captain at http://127.0.0.1:")


def test_one_adapter_runs_in_every_runtime(run):
    """Notebook 06's table of runtimes, on a QLoRA run: every form of the adapter keeps the answers, and the forms
    over the original 16-bit weights sit at the same distance from the 4-bit model it was trained on."""
    run_dir, _ = run
    table = json.loads((run_dir / "eval.json").read_text())["runtimes"]
    assert len(table) == 6, list(table)
    trained = table["peft, 4-bit base (as trained)"]
    for name in ("merged 16-bit (transformers)", "merged GGUF F16 (llama.cpp)", "base GGUF + adapter GGUF (llama.cpp)"):
        assert table[name]["exact match"] >= trained["exact match"] - 0.25, name
    sixteen_bit = table["merged 16-bit (transformers)"]["max |Δ logit| vs trained"]
    assert abs(table["base GGUF + adapter GGUF (llama.cpp)"]["max |Δ logit| vs trained"] - sixteen_bit) < 0.05
    assert (run_dir / "serve" / "adapter_captain-F16.gguf").exists()
    assert "ADAPTER ./adapter-F16.gguf" in (run_dir / "serve" / "Modelfile").read_text()
