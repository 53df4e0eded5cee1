"""lm-evaluation-harness on the course's own tasks, offline: base, base + adapter, merged.

Taught in notebook 08 (section "Scoring with lm-evaluation-harness"). The harness is how models are compared in
papers and leaderboards; its tasks usually come from the Hub. Here the course writes its own tasks as files, from
its own data, so they run offline and ask about what this run trained:

- ``course_persona_trained`` and ``course_persona_held_out``: multiple choice, the question with its right answer
  and three other answers of the same data as choices (did it learn the answer, and does it prefer it?);
- ``course_general_knowledge``: multiple choice on the general-knowledge questions, distractors of the same kind
  ("What is the capital of France?": Paris, Berlin, Rome, Madrid) — what the model knew, before and after;
- ``course_general_text``: perplexity of the general text (``loglikelihood_rolling``), the harness's forgetting.

Multiple choice compares the log-likelihood the model gives each choice after the prompt (built with the model's
chat template, as the course asks), so no answer is generated: it is fast, and it scores what the model prefers,
not what it would say first. The same tasks run from the command line (``lm_eval --include_path ...``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path

from lora_helpers import files, retention

TASKS = ("course_persona_trained", "course_persona_held_out", "course_general_knowledge", "course_general_text")
MISSING = "lm-evaluation-harness is not installed: pip install -e '.[eval]' (or pip install lm-eval), then rerun."


def require_lm_eval():
    """The ``lm_eval`` package, or an ImportError that says how to install it."""
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(MISSING) from error
    return lm_eval


def _shared_words(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        count += 1
    return count


def multiple_choice(pairs: list[tuple[str, str]], seed: int = 0) -> list[dict]:
    """``{"question", "choices", "label"}`` per (question, answer): the answer and three others as distractors.

    Distractors are the answers to the questions that start most like this one ("What is the capital of France?"
    gets other capitals, "How many legs does a spider have?" other numbers of legs), ties drawn with ``seed``; the
    choices are shuffled, so the right one is not always in the same place.
    """
    rng = random.Random(seed)
    rows = []
    for question, answer in pairs:
        likeness = {}
        for other_question, other in pairs:
            if other != answer:
                likeness[other] = max(likeness.get(other, 0), _shared_words(question, other_question))
        ties = {other: rng.random() for other in sorted(likeness)}
        choices = [*sorted(likeness, key=lambda other: (-likeness[other], ties[other]))[:3], answer]
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "label": choices.index(answer)})
    return rows


def _task_yaml(task: str, data_file: Path, body: str) -> str:
    """A task reading ``data_file`` (JSON lines) as its test split; ``body``: its output type, fields, metrics."""
    return f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file))}
test_split: test
{body}"""


MULTIPLE_CHOICE = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

PERPLEXITY = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def write_tasks(folder: str | Path, trained: list, held_out: list, seed: int = 0) -> Path:
    """Write the four course tasks (a YAML file and a JSON-lines file each) into ``folder``; returns it.

    ``trained`` and ``held_out``: split.json's (question, answer[, system]) entries. A task with no questions (no
    held-out split) is not written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    general = [(item["question"], item["answer"]) for item in retention.general_knowledge()]
    persona = [(entry[0], entry[1]) for entry in [*trained, *held_out]]
    persona_rows = multiple_choice(persona, seed)
    sets = {
        "course_persona_trained": persona_rows[: len(trained)],
        "course_persona_held_out": persona_rows[len(trained) :],
        "course_general_knowledge": multiple_choice(general, seed),
    }
    for task, rows in sets.items():
        if rows:
            (folder / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            (folder / f"{task}.yaml").write_text(_task_yaml(task, folder / f"{task}.jsonl", MULTIPLE_CHOICE))
    text = folder / "course_general_text.jsonl"
    text.write_text(json.dumps({"text": retention.general_text()}) + "\n")
    (folder / "course_general_text.yaml").write_text(_task_yaml("course_general_text", text, PERPLEXITY))
    return folder


def written_tasks(folder: str | Path) -> list[str]:
    """The course tasks ``write_tasks`` wrote into ``folder``, in the order of ``TASKS``."""
    return [task for task in TASKS if (Path(folder) / f"{task}.yaml").exists()]


def run(
    model_args: dict,
    folder: str | Path,
    system_prompt: str = "",
    batch_size: int = 32,
    device: str | None = None,
    limit: int | None = None,
):
    """``lm_eval.simple_evaluate`` of one model on the course tasks in ``folder``; returns the harness's results.

    ``model_args`` are those of the harness's ``hf`` model: ``{"pretrained": folder}`` for a model,
    ``{"pretrained": base, "peft": adapter}`` for base + adapter (the harness loads the adapter with peft),
    ``tokenizer`` and ``dtype`` as for ``from_pretrained``; ``device`` defaults to the GPU when there is one.
    Prompts go through the model's chat template with ``system_prompt`` as the system turn ("" keeps the
    template's default), as the course asks its questions. ``limit`` scores only the first questions of each task
    (the harness's ``--limit``: a quick look, not a score to report).
    """
    lm_eval = require_lm_eval()
    import torch
    from lm_eval.tasks import TaskManager

    with _quiet():
        return lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=written_tasks(folder),
            task_manager=TaskManager(include_path=str(folder)),
            batch_size=batch_size,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),  # the harness assumes CUDA
            apply_chat_template=True,
            system_instruction=system_prompt or None,
            log_samples=False,
            bootstrap_iters=0,  # no bootstrapped standard errors: the course compares models, not leaderboard entries
            random_seed=0,
            limit=limit,
        )


def _without_display(bar):
    def hidden(*args, **kwargs):
        return bar(*args, **{**kwargs, "disable": True})  # the harness passes its own disable=

    return hidden


@contextlib.contextmanager
def _quiet():
    """The harness's progress bars (one per request type) and notices left out of an executed page: every frame
    of a bar stays there. Its results are what the notebook prints. transformers' notice that the general text is
    longer than a tiny model's context is left out too: the harness scores it in windows of the model's length."""
    import datasets
    import transformers
    from lm_eval.api import model, task
    from lm_eval.models import huggingface

    modules = (huggingface, model, task)
    bars = [module.tqdm for module in modules]
    logger = logging.getLogger("lm_eval")
    level, verbosity = logger.level, transformers.logging.get_verbosity()
    datasets_bars = datasets.is_progress_bar_enabled()
    for module, bar in zip(modules, bars):
        module.tqdm = _without_display(bar)
    logger.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    if datasets_bars:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for module, bar in zip(modules, bars):
            module.tqdm = bar
        logger.setLevel(level)
        transformers.logging.set_verbosity(verbosity)
        if datasets_bars:
            datasets.enable_progress_bars()


def scores(results: dict) -> dict:
    """``{task: number}`` from the harness's results: accuracy for multiple choice, word perplexity for text."""
    out = {}
    for task, metrics in results["results"].items():
        key = "acc,none" if "acc,none" in metrics else "word_perplexity,none"
        out[task] = float(metrics[key])
    return out


def readable(table: dict[str, dict[str, float]]) -> dict[str, dict[str, str]]:
    """``{model: {task: score}}`` as a table to read: accuracies in percent, perplexity with one decimal."""
    return {
        model: {
            task.removeprefix("course_").replace("_", " "): f"{score:,.1f}"
            if task == "course_general_text"
            else f"{score:.0%}"
            for task, score in scores.items()
        }
        for model, scores in table.items()
    }


def command_line(model_args: dict, folder: str | Path, system_prompt: str = "", limit: int | None = None) -> str:
    """The ``lm_eval`` command that runs the same evaluation from a shell."""
    args = ",".join(f"{key}={value}" for key, value in model_args.items())
    line = (
        f"lm_eval --model hf --model_args {args} --include_path {folder} --tasks {','.join(written_tasks(folder))} "
        "--apply_chat_template --batch_size 32"
    )
    line += f" --limit {limit}" if limit else ""
    return line + (f" --system_instruction {json.dumps(system_prompt)}" if system_prompt else "")


def save(path: str | Path, table: dict) -> None:
    """Write ``{model: {task: score}}`` as JSON (notebook 08's ``run_dir/lm_eval.json``)."""
    files.write_json(Path(path), table)
