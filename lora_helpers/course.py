"""The course runner: execute the notebooks in order with papermill and summarise the run.

``python -m lora_helpers course --preset tiny`` (or the ``lora-course`` command)
runs 01 to 07, writes executed copies to ``run_dir/notebooks/``, stops at the
first failing notebook naming the cell and the error, and writes
``run_dir/summary.json``. The README's "Run the course" section explains it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lora_helpers import device, files, process

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
ARTIFACTS = {
    "notebooks": "notebooks",
    "adapter": "adapter",
    "merged": "merged",
    "loss_plot": "loss.png",
    "eval": "eval.json",
    "training_log": "training_log.json",
}


# On the tiny preset every cell takes seconds: one running 10 minutes has hung, and fails rather than blocking
# CI. Real presets train for an hour in one cell, so they get no limit.
TINY_CELL_TIMEOUT_S = 600


# An executed notebook is a page to read, not a terminal to watch: its progress bars would be saved as dozens of
# frozen widgets ("0%| | 0/43" on GitHub). The runner's kernels draw none; a learner's own Jupyter or Colab keeps them.
EXECUTED_PAGE_ENV = {
    process.EXECUTED_PAGE: "1",  # the trainer prints about ten lines instead of its live table (notebooks 04, 06)
    "TQDM_DISABLE": "1",  # tqdm's own default (tqdm >= 4.66 reads TQDM_<argument>)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's and transformers' bars (downloads, loading weights)
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map, filter and tokenization bars
}


def kernel_manager_class():
    """Jupyter's kernel manager, talking to the kernel over local IPC sockets instead of TCP.

    Over TCP, ipykernel warns before every notebook that the connection is not encrypted; the runner's kernels
    only ever talk to this process on this machine, so IPC sockets (in the temporary folder) are the right
    transport and there is nothing to warn about.
    """
    import tempfile
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            """The kernel's own stdout and stderr (not the notebook's output, which comes by message) go to a log
            beside the executed notebook instead of the terminal: the runner reports errors itself."""
            kw["env"] = {**(kw.get("env") or os.environ), **EXECUTED_PAGE_ENV}
            log = os.environ.get(KERNEL_LOG_ENV)
            if log:
                kw.setdefault("stdout", open(log, "ab"))  # noqa: SIM115 (the kernel process keeps it open)
                kw.setdefault("stderr", subprocess.STDOUT)
            return await super().start_kernel(**kw)

        @default("transport")
        def _default_transport(self):
            return "ipc"

        @default("ip")
        def _default_ip(self):
            return str(Path(tempfile.gettempdir()) / f"lora-course-kernel-{uuid.uuid4().hex[:12]}")

    return IPCKernelManager


class NotebookFailed(RuntimeError):
    """A notebook raised: which one, in which cell, with which error."""


class CourseInterrupted(NotebookFailed):
    """Ctrl-C during a notebook: the summary says where, and how to continue."""


def next_command(preset: str, run_dir: Path, notebook: Path, params: dict, overwrite: bool) -> str:
    """The command that continues a course stopped in ``notebook``: training resumes from its last checkpoint."""
    number = notebook.name[:2]
    rest = [nb.name[:2] for nb in course_notebooks() if nb.name[:2] >= number]
    given = dict(params)
    if number == "04" and any((run_dir / "checkpoints").glob("checkpoint-*")):
        given["resume"] = True
    # the results this run already wrote in the notebooks still to come (notebook 05's merged/ before its export
    # failed) are its own: continuing replaces them
    written = any((run_dir / name).exists() for nb in rest for name in RESULTS.get(nb, ()))
    flags = " --overwrite" if overwrite or written else ""
    values = "".join(f" -p {shlex.quote(f'{name}={value}')}" for name, value in given.items())
    return (
        f"lora-course course --preset {shlex.quote(preset)} --run-dir {shlex.quote(str(run_dir))} "
        f"--only {' '.join(rest)}{flags}{values}"
    )


# What each notebook leaves in run_dir. The runner does not write over a selected notebook's results without
# --overwrite, whether the notebook would succeed or fail (nor its executed copy, nor summary.json).
RESULTS = {
    "04": files.FINISHED_RUN_MARKERS,
    "05": ("merged", "gguf"),
    "06": ("eval.json",),
    "07": ("multi-gpu",),
    "08": ("experiments.json",),
}


def refuse_finished_notebooks(run_dir: Path, notebooks: list[Path], overwrite: bool) -> None:
    """Stop before notebook 01 when a selected notebook already finished in ``run_dir`` (its results, or its
    executed copy marked ok in summary.json), unless ``overwrite``."""
    if overwrite:
        return
    summary = files.read_json(run_dir / "summary.json", missing={})
    finished = {nb["name"] for nb in summary.get("notebooks", []) if nb.get("status") == "ok"}
    found = []
    for notebook in notebooks:
        held = [name for name in RESULTS.get(notebook.name[:2], ()) if (run_dir / name).exists()]
        held += [f"notebooks/{notebook.name}"] if notebook.name in finished else []
        if held:
            found.append(f"notebook {notebook.name[:2]}: {', '.join(held)}")
    if found:
        raise FileExistsError(
            f"{run_dir} already holds the results of a finished run ({'; '.join(found)}). Choose another "
            "--run-dir, or run with --overwrite to replace them."
        )


def check_resume(settings, run_dir: Path, trainer_route: str) -> None:
    """``-p resume=True``: the settings notebook 04 would train with (``check_values``' result) must be the ones its
    checkpoints started with (``training.check_resume_settings``), checked before notebook 01."""
    import dataclasses

    from lora_helpers import training

    run_config = {**dataclasses.asdict(settings), "trainer_route": trainer_route}  # as notebook 04 writes it
    training.check_resume_settings(run_dir / "checkpoints", run_config)


def refuse_another_preset(preset: str, run_dir: Path, notebooks: list[Path]) -> None:
    """Notebooks 05 and 06, run without notebook 04, continue the run that run_config.json describes, whatever
    --preset says: a different --preset would be recorded in summary.json for a run it did not make."""
    if not any(nb.name[:2] in ("05", "06") for nb in notebooks):
        return
    trained = files.read_json(run_dir / "run_config.json", missing={}).get("preset")
    if trained is not None and trained != preset:
        raise ValueError(
            f"{run_dir} holds a run of the preset {trained!r} (run_config.json), and notebooks 05 and 06 continue it "
            f"whatever --preset says: pass --preset {trained}, or train this preset again with notebook 04 "
            "(--only 04 05 06 --overwrite)."
        )


def refuse_source_folder(run_dir: Path) -> None:
    """A run_dir whose notebooks/ would be the course's own (the repository itself) is refused: the executed
    copies would replace the lessons."""
    if (run_dir / "notebooks").resolve() == NOTEBOOKS_DIR.resolve() or (run_dir / "lora_helpers").is_dir():
        raise ValueError(
            f"--run-dir {run_dir} is the course's own folder: the executed notebooks would be written over "
            f"{NOTEBOOKS_DIR}. Choose a run_dir of its own, e.g. --run-dir runs/tiny (the default)."
        )


def course_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order; ``only=["04", "05"]`` keeps those whose name starts so."""
    if not NOTEBOOKS_DIR.is_dir():
        raise FileNotFoundError(
            f"No notebooks at {NOTEBOOKS_DIR}. Install the course from its repository with `pip install -e .`."
        )
    notebooks = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(prefix) for prefix in only)]
        if not notebooks:
            raise ValueError(f"--only {' '.join(only)} matches no notebook in {NOTEBOOKS_DIR}.")
    return notebooks


def parse_value(text: str):
    """Read a ``-p name=value`` value as papermill's CLI does: int, float, bool, None, else string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_parameters(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"Parameter {pair!r} should look like name=value, e.g. -p lora_r=8.")
        params[name.strip()] = parse_value(value.strip())
    return params


def notebook_parameters(path: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(path)))


def choices() -> dict[str, tuple[str, ...]]:
    """Notebook parameters that are not settings, and the values they accept."""
    from lora_helpers import merge

    return {"trainer_route": ("sft", "trainer"), "merge_mode": merge.MERGE_MODES}


def check_values(preset: str, params: dict):
    """Refuse a ``-p`` value no notebook could use, before any notebook runs (settings through the preset's own
    checks, ``presets.check_settings``); return the settings they give."""
    from lora_helpers import gguf_export, presets

    settings = presets.resolve_settings(preset, **{k: v for k, v in params.items() if k in presets.SETTING_NAMES})
    for name, accepted in choices().items():
        if name in params and params[name] not in accepted:
            raise ValueError(f"-p {name}={params[name]}: use one of {', '.join(accepted)}.")
    gguf_types = params.get("gguf_types")  # None: notebook 05's default, which exports
    gguf_export.parse_file_types(str(gguf_types or ""))
    if gguf_types != "":  # notebook 05 writes the system prompt into an Ollama Modelfile
        gguf_export.check_ollama_text(settings.system_prompt, "system_prompt")
    if settings.packing and params.get("trainer_route") == "trainer":
        raise ValueError(
            f"packing={settings.packing} (preset {settings.preset}) needs trainer_route='sft': packing is SFTTrainer's; "
            "the plain Trainer route pads every example to max_length, as the Llama-2 about-me recipe does. Add "
            "-p packing=False to take the Trainer route."
        )
    tolerance = params.get("merge_tolerance")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"-p merge_tolerance={tolerance}: the largest allowed |Δ logit| must be a number above 0.")
    return settings


def run_course(
    preset: str = "tiny",
    run_dir: str | Path | None = None,
    only: list[str] | None = None,
    params: dict | None = None,
    overwrite: bool = False,
    rehearse_t4: bool = False,
    random_weights: bool = False,
    echo=print,
) -> dict:
    """Run the notebooks in order; return (and write) the summary. Raises ``NotebookFailed`` on the first failure.

    ``rehearse_t4``: every notebook runs as on a Colab T4 (``device.rehearse_t4``). ``random_weights``: the
    preset's model is replaced by a random-weight model of its exact shapes and family tokenizer
    (``tiny.real_size_model_dir``), so a 7B run needs no download. Each notebook's peak GPU memory and host RSS
    go into ``summary.json``.
    """

    from lora_helpers import presets

    settings = presets.get_preset(preset)  # unknown presets fail here, before any notebook starts
    run_dir = Path(run_dir or f"runs/{preset}").expanduser().resolve()
    params = dict(params or {})
    for reserved in ("preset", "run_dir", "overwrite", "rehearse_t4"):
        if reserved in params:
            raise ValueError(f"Pass {reserved} with --{reserved.replace('_', '-')}, not with -p.")
    notebooks = course_notebooks(only)
    declared = {nb: notebook_parameters(nb) for nb in notebooks}
    unknown = set(params) - set().union(*declared.values())
    if unknown:
        known = sorted(set().union(*declared.values()))
        raise ValueError(f"No notebook declares the parameter(s) {sorted(unknown)}. Declared: {', '.join(known)}.")
    resolved = check_values(preset, params)  # every value, before notebook 01 starts (not in 04, after two loads)
    refuse_source_folder(run_dir)
    if any(nb.name.startswith("04") for nb in notebooks):
        if params.get("resume"):
            check_resume(resolved, run_dir, params.get("trainer_route", "sft"))
        files.refuse_to_overwrite(run_dir, overwrite)  # before notebook 01 starts, not after it
    else:
        refuse_another_preset(preset, run_dir, notebooks)
    refuse_finished_notebooks(run_dir, notebooks, overwrite)  # a refused run changes nothing
    if random_weights:
        from lora_helpers import tiny

        shape = tiny.real_size_name(params.get("model_id") or settings.model_id)
        echo(f"random-weight model with the shapes of {shape} ...", end=" ", flush=True)
        params["model_id"] = str(tiny.real_size_model_dir(shape))  # built once, before notebook 01 starts
        echo(params["model_id"])
    if preset == "tiny":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny preset never needs the network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    lock = files.lock_run_dir(run_dir, f"lora-course course --preset {preset}")  # refuses while another writes
    os.environ[files.LOCK_OWNER_ENV] = str(os.getpid())  # the notebooks' kernels work under this lock
    files.reserve_space(run_dir)  # freed to record a failure on a disk that filled up
    try:
        return _run_notebooks(preset, run_dir, notebooks, declared, params, overwrite, rehearse_t4, echo)
    finally:
        files.release_space(run_dir)
        lock.release()


def _run_notebooks(preset, run_dir, notebooks, declared, params, overwrite, rehearse_t4, echo) -> dict:
    import papermill

    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"preset": preset, "run_dir": str(run_dir), "parameters": params, "status": "running", "notebooks": []}
    if rehearse_t4:
        summary["rehearse_t4"] = True
    total_start = time.time()
    for index, notebook in enumerate(notebooks, 1):
        given = {
            "preset": preset,
            "run_dir": str(run_dir),
            "overwrite": overwrite,
            "rehearse_t4": rehearse_t4,
            **params,
        }
        given = {k: v for k, v in given.items() if k in declared[notebook]}
        echo(f"[{index}/{len(notebooks)}] {notebook.name} ...", end=" ", flush=True)
        start = time.time()
        peaks_file = out_dir / f".peaks-{notebook.stem}.json"
        peaks_file.unlink(missing_ok=True)
        os.environ[device.PEAKS_ENV] = str(peaks_file)  # the kernel inherits it and writes its peaks at exit
        kernel_log = out_dir / f"{notebook.stem}.kernel.log"
        kernel_log.unlink(missing_ok=True)
        os.environ[KERNEL_LOG_ENV] = str(kernel_log)
        try:
            papermill.execute_notebook(
                str(notebook),
                str(out_dir / notebook.name),
                parameters=given,
                kernel_name="python3",
                cwd=str(NOTEBOOKS_DIR),
                execution_timeout=TINY_CELL_TIMEOUT_S if preset == "tiny" else None,
                progress_bar=False,
                log_output=False,
                kernel_manager_class=kernel_manager_class(),
            )
        except (Exception, KeyboardInterrupt) as error:  # a cell that raised or hung, a dead kernel, Ctrl-C
            seconds = round(time.time() - start, 1)
            files.release_space(run_dir)  # room for what follows, if the disk is full
            summary["notebooks"].append({"name": notebook.name, "seconds": seconds, **read_peaks(peaks_file)})
            summary["next"] = next_command(preset, run_dir, notebook, params, overwrite)
            failure = notebook_failure(error, summary, out_dir / notebook.name, kernel_log)
            repair_executed_notebook(notebook, out_dir / notebook.name, failure)
            try:
                write_summary(run_dir, summary, time.time() - total_start)
                written = f"summary.json says so, with the command to continue: {summary['next']}"
            except Exception as summary_error:  # the notebook's own error stays the one reported
                written = f"(summary.json could not be written: {type(summary_error).__name__}: {summary_error})"
            echo(f"{summary['status'].upper()} after {seconds} s")
            raise type(failure)(f"{failure}\n{written}") from None
        seconds = round(time.time() - start, 1)
        if kernel_log.exists() and not kernel_log.stat().st_size:
            kernel_log.unlink()
        peaks = read_peaks(peaks_file)
        summary["notebooks"].append({"name": notebook.name, "seconds": seconds, "status": "ok", **peaks})
        echo(f"ok ({seconds} s{format_peaks(peaks)})")
    summary["status"] = "ok"
    return write_summary(run_dir, summary, time.time() - total_start)


KERNEL_LOG_ENV = "LORA_COURSE_KERNEL_LOG"


def repair_executed_notebook(source: Path, executed: Path, failure: Exception) -> Path | None:
    """After a failure: an executed copy that is not a valid notebook (papermill was writing it when the disk filled)
    is kept beside as ``NN.ipynb.cut-short`` and replaced by the lesson itself, opened by a cell that says what
    happened, so that ``notebooks/`` holds only notebooks that open. Returns the kept copy, or None if it was valid."""
    import nbformat

    if not executed.exists():
        return None
    try:
        nbformat.read(executed, as_version=4)
        return None
    except Exception:  # JSON cut short, or empty
        kept = executed.with_name(executed.name + ".cut-short")
        executed.replace(kept)
    lesson = nbformat.read(source, as_version=4)
    note = (
        f"**This run of the notebook failed, and its executed copy could not be written whole.**\n\n"
        f"```\n{failure}\n```\n\nWhat papermill had written is kept in `{kept.name}`. Below is the lesson "
        "without outputs; `summary.json` in the run_dir has the command that continues."
    )
    lesson.cells.insert(0, nbformat.v4.new_markdown_cell(note))
    nbformat.write(lesson, executed)
    return kept


def notebook_failure(error: BaseException, summary: dict, executed: Path, kernel_log: Path) -> NotebookFailed:
    """The error to raise for a notebook that failed or was interrupted, naming the cell, with what can explain it.

    Marks the summary's last notebook and the run as failed or interrupted, and records the error in it."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        cell, kind, message = error.exec_count, error.ename, error.evalue
    else:
        cell, kind, message = "?", type(error).__name__, (str(error).strip().splitlines() or [""])[0]
    interrupted = kind == "KeyboardInterrupt"
    status = "interrupted" if interrupted else "failed"
    summary["notebooks"][-1]["status"] = summary["status"] = status
    summary["error"] = {"notebook": executed.name, "cell": cell, "type": kind, "message": message}
    hint = ""
    if kernel_log.exists() and kernel_log.stat().st_size:
        hint += f"What the kernel process itself printed is in {kernel_log}.\n"
    if "No space left on device" in message or "[Errno 28]" in message:
        free = shutil.disk_usage(executed.parent).free / 2**30
        hint += (
            f"The disk that holds {executed.parent.parent} is full ({free:.2f} GB free now): free some space (an "
            "earlier run's merged/ or checkpoints/) or choose a run_dir on a larger disk, then continue.\n"
        )
    if kind == "DeadKernelError":
        hint += (
            "The notebook's Python process died, most often for lack of host memory (the system killed it): "
            "see each notebook's peak in summary.json and `python -m lora_helpers plan`.\n"
        )
    where = f"{executed.name} was interrupted" if interrupted else f"{executed.name} failed"
    return (CourseInterrupted if interrupted else NotebookFailed)(
        f"{where} in cell [{cell}]: {kind}: {message}\n{hint}The executed notebook, with the traceback, is {executed}."
    )


def read_peaks(path: Path) -> dict:
    """The peaks a notebook's kernel wrote at exit (``device.record_peaks``); {} if it died before writing, or
    could not write it whole (a full disk): the notebook's own error is the one to report."""
    try:
        peaks = files.read_json(path) or {}
    except ValueError:
        peaks = {}
    path.unlink(missing_ok=True)
    return peaks


def format_peaks(peaks: dict) -> str:
    text = f", host RSS {peaks['host_peak_rss_gb']} GB" if "host_peak_rss_gb" in peaks else ""
    if "host_peak_private_gb" in peaks:
        text += f" ({peaks['host_peak_private_gb']} GB private)"
    if "gpu_max_reserved_gb" in peaks:
        text += f", GPU {peaks['gpu_max_reserved_gb']} GB reserved / {peaks['gpu_max_allocated_gb']} GB allocated"
    return text


def write_summary(run_dir: Path, summary: dict, seconds: float) -> dict:
    """Add results and artifact paths from ``run_dir`` to the summary and write ``summary.json``."""
    summary["total_seconds"] = round(seconds, 1)
    log = files.read_json(run_dir / ARTIFACTS["training_log"])
    if log:
        summary["final_train_loss"] = log.get("final_train_loss")
        summary["final_eval_loss"] = log.get("final_eval_loss")
        summary["final_eval_perplexity"] = log.get("final_eval_perplexity")
    evaluation = files.read_json(run_dir / ARTIFACTS["eval"])
    if evaluation:
        summary["exact_match"] = {k: evaluation.get(k) for k in ("base", "fine_tuned", "merged")}
        known = evaluation.get("general_knowledge", {})  # notebook 06: what the model kept of what it knew
        if known:
            kept = {k: v["retention"] for k, v in known.items() if v["retention"] is not None}
            summary["retention"] = kept or None  # None on random weights: the base knew nothing to keep
            summary["general_text_loss"] = {k: round(v["text_loss"], 3) for k, v in known.items()}
    summary["artifacts"] = {k: str(run_dir / v) for k, v in ARTIFACTS.items() if (run_dir / v).exists()}
    files.write_json(run_dir / "summary.json", summary)
    return summary


def rounded(value, digits: int = 4):
    """Floats to ``digits`` significant digits, inside dicts too: what a loss or a rate means, not its last bits."""
    if isinstance(value, dict):
        return {key: rounded(v, digits) for key, v in value.items()}
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def print_summary(summary: dict, stream=sys.stdout) -> None:
    print(f"\nCourse run: {summary['status']} in {summary['total_seconds']} s  ({summary['run_dir']})", file=stream)
    for nb in summary["notebooks"]:
        print(f"  {nb['name']:<28} {nb['seconds']:>7} s  {nb['status']}{format_peaks(nb)}", file=stream)
    for key in (
        "final_train_loss",
        "final_eval_loss",
        "final_eval_perplexity",
        "exact_match",
        "retention",
        "general_text_loss",
    ):
        if summary.get(key) is not None:
            print(f"  {key}: {rounded(summary[key])}", file=stream)
    for key, path in summary.get("artifacts", {}).items():
        print(f"  {key:<13} {path}", file=stream)
