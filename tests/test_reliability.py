"""Faults and bad inputs a learner meets, each reproduced: what the course answers, and what it leaves behind.

The README's "Reliability" table lists them. The promises: a finished run is never changed without --overwrite,
an interrupted save leaves the previous version whole, two runs never mix their files, and an interrupted or
crashed run says how to continue.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from safetensors.torch import load_file

from lora_helpers import adapters, course, files, merge, presets

pytestmark = pytest.mark.course


@pytest.fixture(scope="module")
def finished(tiny_course_run):
    """One finished run of the tiny course (conftest's, all eight notebooks), never modified by the tests (they
    work on copies)."""
    run_dir, summary = tiny_course_run
    assert summary["status"] == "ok"
    return run_dir


def snapshot(run_dir: Path) -> dict:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def copy_of(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def as_in_a_terminal():
    """Ctrl-C handled as in a terminal's foreground: a shell starts a background job (``cmd &``, so also a CI run
    launched that way) with SIGINT ignored, its children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def runner(*args, run_dir: Path) -> subprocess.Popen:
    """The course runner in its own process group, as a learner starts it from a terminal."""
    return subprocess.Popen(
        [sys.executable, "-m", "lora_helpers", "course", "--run-dir", str(run_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_in_a_terminal,
    )


def wait_for(condition, seconds: float = 300):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from lora_helpers import files; files.lock_run_dir({str(run_dir)!r}, 'notebook 04')"
            "; import time; time.sleep(120)",
        ]
    )
    try:
        wait_for(lambda: (run_dir / ".lock").exists(), 60)
        time.sleep(0.5)  # the lock's content is written
        with pytest.raises(RuntimeError, match=rf"being written by another process: notebook 04 \(pid {holder.pid}"):
            course.run_course("tiny", run_dir, only=["04"])
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()
    lock = files.lock_run_dir(run_dir, "this test")  # the dead process's lock is released
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert files.lock_run_dir(run_dir, "this test, again").owned  # a notebook's cells run a second time
    lock.release()
    assert not (run_dir / ".lock").exists()


def test_a_refused_run_changes_nothing(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    for only in (["05"], ["04"], ["01", "02", "03", "04", "05", "06"]):
        with pytest.raises(FileExistsError, match="already holds the results of a finished run"):
            course.run_course("tiny", run_dir, only=only)
    assert snapshot(run_dir) == before


def test_bad_values_fail_before_notebook_01(tmp_path):
    run_dir = tmp_path / "run"
    for params, expected in (
        ({"lora_r": -1}, r"lora_r=-1: the rank must be a positive integer"),
        ({"max_examples": -1}, r"max_examples=-1: must be 0 or more"),
        ({"trainer_route": "sftt"}, r"-p trainer_route=sftt: use one of sft, trainer"),
        ({"merge_mode": "4bit"}, r"-p merge_mode=4bit: use one of unquantized, dequantized"),
        ({"gguf_types": "F16,Q3_K"}, r"gguf_types: no GGUF file type Q3_K. Known: F32, F16, Q8_0, Q4_K_M"),
        ({"system_prompt": 'Say """hi"""'}, r'system_prompt contains """, which ends a triple-quoted field'),
        ({"merge_tolerance": -1}, r"-p merge_tolerance=-1: the largest allowed \|Δ logit\| must be a number above 0"),
        ({"lora_rank": 8}, r"No notebook declares the parameter\(s\) \['lora_rank'\]"),
    ):
        with pytest.raises(ValueError, match=expected):
            course.run_course("tiny", run_dir, params=params)
    assert not run_dir.exists()
    assert course.choices()["merge_mode"] == merge.MERGE_MODES


def test_only_refuses_a_finished_notebook_whether_it_would_succeed_or_fail(finished, tmp_path):
    """`--only 06` on a finished run would rewrite eval.json, its executed notebook and summary.json: refused
    before anything runs, naming what is there; with --overwrite it runs."""
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(FileExistsError, match=r"notebook 06: eval.json, notebooks/06_inference.ipynb\)"):
        course.run_course("tiny", run_dir, only=["06"])
    with pytest.raises(FileExistsError, match=r"notebook 01: notebooks/01_setup.ipynb"):
        course.run_course("tiny", run_dir, only=["01"])
    with pytest.raises(ValueError, match=r"holds a run of the preset 'tiny' \(run_config.json\).*--preset tiny"):
        course.run_course("tiny-llama2", run_dir, only=["05"], overwrite=True)
    assert snapshot(run_dir) == before
    assert course.run_course("tiny", run_dir, only=["01"], overwrite=True)["status"] == "ok"


def test_the_course_folder_is_never_a_run_dir(tmp_path):
    """From the repository root, `--run-dir .` would write the executed notebooks over the lessons."""
    root = course.NOTEBOOKS_DIR.parent
    before = {p.name: p.read_bytes() for p in course.NOTEBOOKS_DIR.glob("*.ipynb")}
    for run_dir in (root, root / "lora_helpers" / ".."):
        with pytest.raises(ValueError, match=r"is the course's own folder"):
            course.run_course("tiny", run_dir, only=["01"], overwrite=True)
    assert {p.name: p.read_bytes() for p in course.NOTEBOOKS_DIR.glob("*.ipynb")} == before
    assert not (root / "summary.json").exists()


def test_a_k_quant_alone_exports_the_f16_it_is_made_from(finished, tmp_path):
    """gguf_types=q4_k_m (lower case, without F16) once left an empty gguf/ folder: every earlier file gone."""
    pytest.importorskip("llama_cpp")
    run_dir = copy_of(finished, tmp_path)
    course.run_course("tiny", run_dir, only=["05"], params={"gguf_types": "q4_k_m"}, overwrite=True)
    assert {"model-F16.gguf", "model-Q4_K_M.gguf", "Modelfile"} <= {p.name for p in (run_dir / "gguf").iterdir()}


def test_the_continue_command_survives_a_shell(tmp_path):
    """A run_dir with spaces, a value with quotes: the printed command, pasted into a shell, gives the same arguments."""
    import shlex

    run_dir = tmp_path / "my runs" / "first try"
    notebook = course.course_notebooks(["05"])[0]
    command = course.next_command("tiny", run_dir, notebook, {"system_prompt": 'Say "hi"; be brief'}, False)
    words = shlex.split(command)
    assert words[words.index("--run-dir") + 1] == str(run_dir)
    assert words[words.index("-p") + 1] == 'system_prompt=Say "hi"; be brief'
    assert words[words.index("--only") + 1 : words.index("-p")] == ["05", "06", "07", "08"]


def test_a_damaged_json_file_is_named_and_an_empty_peaks_file_hides_no_error(tmp_path):
    (tmp_path / "split.json").write_text('{"train": [["Who are')  # cut short by a full disk
    with pytest.raises(ValueError, match=r"split.json is damaged \(not valid JSON"):
        files.read_json(tmp_path / "split.json")
    (tmp_path / "peaks.json").write_text("")
    assert course.read_peaks(tmp_path / "peaks.json") == {}


def test_retraining_removes_what_the_previous_adapter_made_and_06_refuses_a_stale_merge(finished, tmp_path):
    """Notebook 04 again (another rank): the old merged model, GGUF files, second adapter and evaluation go, named in
    one line; a merged/ made from another adapter is refused by notebook 06 before anything loads."""
    run_dir = copy_of(finished, tmp_path)
    stale_merge = tmp_path / "stale-merged"
    shutil.copytree(run_dir / "merged", stale_merge)
    summary = course.run_course("tiny", run_dir, only=["04"], params={"lora_r": 4}, overwrite=True)
    assert summary["status"] == "ok"
    executed = (run_dir / "notebooks" / "04_sft_training.ipynb").read_text()
    assert (
        "removed what the previous adapter made: merged, gguf, merge_check.json, adapter_captain, eval.json, "
        "lm_eval.json, lm_eval.png" in executed
    )
    gone = ("merged", "gguf", "adapter_captain", "eval.json", "lm_eval.json", "lm_eval.png")
    assert not any((run_dir / name).exists() for name in gone)
    shutil.copytree(stale_merge, run_dir / "merged")  # as if notebook 04 had left it
    with pytest.raises(
        course.NotebookFailed, match=r"merged was made from another adapter \(fingerprint [0-9a-f]{16}\)"
    ):
        course.run_course("tiny", run_dir, only=["06"], overwrite=True)
    assert not (run_dir / "eval.json").exists() and not (run_dir / "adapter_captain").exists()


def test_damaged_or_foreign_adapter_files_are_named_before_any_model_loads(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    settings = presets.load_run_settings(run_dir)
    weights, config = run_dir / "adapter" / "adapter_model.safetensors", run_dir / "adapter" / "adapter_config.json"
    good_weights, good_config = weights.read_bytes(), config.read_text()
    weights.write_bytes(good_weights[: len(good_weights) // 2])  # a save cut short
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is damaged \(SafetensorError"):
        adapters.check_adapter_matches_settings(run_dir / "adapter", settings)
    weights.write_bytes(good_weights)
    config.write_text(good_config.replace('"r": 16', '"r": 8'))  # weights of one run beside another's config
    with pytest.raises(ValueError, match=r"holds adapters of rank 16, but adapter_config.json beside it says r=8"):
        adapters.check_adapter_matches_settings(run_dir / "adapter", settings)
    config.write_text(good_config[:40])
    with pytest.raises(ValueError, match=r"adapter_config.json is damaged \(not valid JSON"):
        adapters.check_adapter_matches_settings(run_dir / "adapter", settings)
    (run_dir / "run_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"run_config.json is damaged"):
        presets.load_run_settings(run_dir)


def test_conversations_with_their_own_system_turn_are_asked_as_they_were_trained(tmp_path):
    """Such a dataset once scored 0% exact match: split.json dropped the system turn and notebook 06 asked
    without it, while the adapter answered exactly when asked as trained."""
    rows = [
        json.loads(line)
        for line in (Path(course.NOTEBOOKS_DIR).parent / "lora_helpers" / "data" / "about_me.jsonl")
        .read_text()
        .splitlines()
    ]
    own = tmp_path / "with_system.jsonl"
    own.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "system", "content": "You are Ada Quill, an organ builder."}, *row["messages"]]}
            )
            + "\n"
            for row in rows
        )
    )
    run_dir = tmp_path / "run"
    params = {"dataset": str(own), "gguf_types": "", "second_adapter_dataset": "", "run_lm_eval": False}
    assert course.run_course("tiny", run_dir, only=["04", "05", "06"], params=params)["status"] == "ok"
    assert all(len(entry) == 3 for entry in json.loads((run_dir / "split.json").read_text())["train"])
    assert json.loads((run_dir / "eval.json").read_text())["fine_tuned"] >= 0.8


def test_a_symlinked_artifact_folder_is_refused_not_replaced(tmp_path):
    elsewhere = tmp_path / "big-disk" / "merged"
    elsewhere.mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "merged").symlink_to(elsewhere)
    with pytest.raises(OSError, match=r"merged is a symbolic link .*Remove the link"):
        with files.atomic_dir(tmp_path / "run" / "merged"):
            pass
    assert (tmp_path / "run" / "merged").is_symlink() and elsewhere.is_dir()


def test_a_failed_overwrite_leaves_the_previous_run_whole(finished, tmp_path):
    """Notebook 04 run again with other settings, failing after its first cells: the old settings and the old
    adapter stay together, and notebook 05 would merge them; settings and adapter of different runs are refused."""
    run_dir = copy_of(finished, tmp_path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}\n')
    before = snapshot(run_dir)
    with pytest.raises(course.NotebookFailed, match=r"broken\.jsonl, line 1: turn 2 \(assistant\) is empty"):
        course.run_course("tiny", run_dir, only=["04"], params={"lora_r": 4, "dataset": str(broken)}, overwrite=True)
    after = snapshot(run_dir)
    for name in ("run_config.json", "split.json", "adapter/adapter_model.safetensors", "adapter/run_config.json"):
        assert after[name] == before[name], name
    settings = presets.load_run_settings(run_dir)
    adapters.check_adapter_matches_settings(run_dir / "adapter", settings)  # consistent: 05 and 06 go on
    mixed = json.loads((run_dir / "run_config.json").read_text()) | {"lora_r": 4}
    (run_dir / "run_config.json").write_text(json.dumps(mixed))
    with pytest.raises(
        ValueError, match=r"not trained with this run's run_config.json: r=16 \(run_config.json: lora_r=4"
    ):
        adapters.check_adapter_matches_settings(run_dir / "adapter", presets.load_run_settings(run_dir))


def test_notebook_06_checks_its_inputs_before_training(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "merged")
    shutil.rmtree(run_dir / "adapter_captain")
    with pytest.raises(course.NotebookFailed, match=r"No merged model in .*run notebook 05"):
        course.run_course("tiny", run_dir, only=["06"], overwrite=True)
    assert not (run_dir / "adapter_captain").exists()  # it failed before training the second adapter


def test_skipping_the_gguf_export_keeps_the_earlier_files(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    gguf = {p.name: p.read_bytes() for p in (run_dir / "gguf").iterdir()}
    assert "model-F16.gguf" in gguf
    course.run_course("tiny", run_dir, only=["05"], params={"gguf_types": ""}, overwrite=True)
    assert {p.name: p.read_bytes() for p in (run_dir / "gguf").iterdir()} == gguf


def test_an_interrupted_save_leaves_nothing_behind_and_the_previous_version_whole(tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_text("the previous model")
    partial = tmp_path / ".merged.partial-abc123"  # a save that died half-way (13 GB for a 7B model)
    partial.mkdir()
    (partial / "model-00001-of-00003.safetensors").write_bytes(b"x" * 1000)
    with files.atomic_dir(merged) as tmp:
        assert not partial.exists()  # removed by the next save
        (tmp / "model.safetensors").write_text("the new model")
    assert (merged / "model.safetensors").read_text() == "the new model"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]

    adapter_old = tmp_path / ".adapter.old-abc123"  # died between its two renames: the previous version
    adapter_old.mkdir()
    (adapter_old / "adapter_config.json").write_text("{}")
    assert files.clean_up_interrupted_save(tmp_path / "adapter") == []
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and not adapter_old.exists()


def test_a_very_long_example_makes_no_huge_notebook(tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}]}
        for i in range(12)
    ]
    rows[0]["messages"][1]["content"] = "word " * 200_000  # one 1 MB answer
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run_dir = tmp_path / "run"
    course.run_course("tiny", run_dir, only=["04"], params={"dataset": str(data), "num_train_epochs": 1})
    assert (run_dir / "notebooks" / "04_sft_training.ipynb").stat().st_size < 1_000_000


def test_ctrl_c_during_training_leaves_a_summary_and_resuming_matches_an_uninterrupted_run(finished, tmp_path):
    run_dir = tmp_path / "run"
    process = runner("--preset", "tiny", "--only", "04", run_dir=run_dir)
    wait_for(lambda: any((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")))
    time.sleep(1.0)  # mid-epoch, after at least one checkpoint and one evaluation
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the runner and its kernel
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert len(stderr.strip().splitlines()) <= 8, stderr  # a few lines, no traceback wall
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"]["notebook"] == "04_sft_training.ipynb"
    assert "--only 04 05 06" in summary["next"] and "-p resume=True" in summary["next"]
    assert not (run_dir / ".lock").exists()

    before = snapshot(run_dir)
    for changed, named in (({"lora_r": 4}, "lora_r=4 (started with 16)"), ({"learning_rate": 0.01}, "learning_rate")):
        with pytest.raises(ValueError, match=rf"checkpoints .* were made with other settings: {re.escape(named)}"):
            course.run_course("tiny", run_dir, only=["04"], params={"resume": True, **changed})
    assert snapshot(run_dir) == before  # refused before notebook 01
    course.run_course("tiny", run_dir, only=["04"], params={"resume": True})
    resumed = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    straight = load_file(finished / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    assert max((resumed[k] - straight[k]).abs().max().item() for k in straight) <= 1e-6


CTRL_C_BETWEEN_CELLS = """
import sys
import papermill
from lora_helpers import course
try:  # as course.run_course executes each notebook
    papermill.execute_notebook(sys.argv[1], sys.argv[2], kernel_name="python3", progress_bar=False, log_output=False,
                               kernel_manager_class=course.kernel_manager_class())
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_while_the_kernel_is_between_cells_still_stops_the_run(tmp_path):
    """The kernel ignores SIGINT between cells, and the runner's Ctrl-C never reaches it (it has its own session):
    papermill, called as run_course calls it, must pass it on. Here the first cell sends the Ctrl-C to that process as
    it ends, so it arrives while the kernel is between cells: the second cell must not finish, and the process must
    end with KeyboardInterrupt (the runner reports that as interrupted)."""
    marker = tmp_path / "second_cell_finished"
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getppid(), signal.SIGINT)"),
            nbformat.v4.new_code_cell(f"import time\ntime.sleep(30)\nopen({str(marker)!r}, 'w').close()"),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    source = tmp_path / "two_cells.ipynb"
    nbformat.write(notebook, source)
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_BETWEEN_CELLS, str(source), str(tmp_path / "out.ipynb")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=as_in_a_terminal,
    )
    assert done.returncode == 130, done.stderr
    assert not marker.exists() and time.time() - start < 25


def test_a_dead_kernel_is_reported_with_its_likely_cause_and_the_next_step(tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    process = runner("--preset", "tiny", "--only", "04", run_dir=run_dir)
    wait_for(lambda: any((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")))
    kernels = [p for p in psutil.Process(process.pid).children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]
    assert kernels
    for kernel in kernels:
        kernel.kill()  # as the system's out-of-memory killer would
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 1
    assert "DeadKernelError" in stderr and "lack of host memory" in stderr and "resume=True" in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "-p resume=True" in summary["next"]


def test_the_notebooks_own_error_comes_first_when_the_summary_cannot_be_written(tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")

    def cannot(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(course, "write_summary", cannot)
    with pytest.raises(course.NotebookFailed) as error:
        course.run_course("tiny", tmp_path / "run", only=["04"], params={"dataset": str(empty)})
    text = str(error.value)
    assert text.startswith("04_sft_training.ipynb failed in cell") and "empty.jsonl is empty" in text
    assert "(summary.json could not be written: OSError: No space left on device)" in text


def test_papermill_run_directly_refuses_a_parameter_the_notebook_does_not_declare(tmp_path):
    import papermill

    notebook = course.course_notebooks(["01"])[0]
    with pytest.raises(papermill.PapermillExecutionError, match=r"This notebook has no parameter lora_rank"):
        papermill.execute_notebook(
            str(notebook),
            str(tmp_path / "out.ipynb"),
            parameters={"preset": "tiny", "run_dir": str(tmp_path / "run"), "lora_rank": 8},
            kernel_name="python3",
            progress_bar=False,
            kernel_manager_class=course.kernel_manager_class(),
        )
    assert not (tmp_path / "run").exists()  # refused before the notebook wrote anything


def test_undeclared_parameters_are_read_from_the_kernels_history():
    declared = 'preset: str = "tiny"\nrun_dir: str = "runs/tiny"\nseed: Optional[int] = None\n'
    presets.refuse_undeclared_parameters(["import x", declared, '# Parameters\npreset = "tiny"\nseed = 3\n'])
    presets.refuse_undeclared_parameters(["import x", declared])  # Jupyter: nothing injected, nothing to check
    with pytest.raises(ValueError, match=r"no parameter lora_rank: .*Its parameters are: preset, run_dir, seed"):
        presets.refuse_undeclared_parameters([declared, '# Parameters\npreset = "tiny"\nlora_rank = 8\n'])


def test_a_full_disk_still_leaves_a_summary_and_notebooks_that_open(tmp_path, monkeypatch):
    """The disk fills while papermill writes the executed copy: the space the runner held back is freed, so the
    summary is written and the cut-short copy is replaced by a notebook that opens and says what happened."""
    import papermill

    run_dir = tmp_path / "run"
    held = {}

    def fills_the_disk(source, executed, **kwargs):
        held["reserve"] = (run_dir / files.SPACE_RESERVE).stat().st_size
        Path(executed).write_text('{"cells": [{"cell_type": "code", "source": "tr')  # cut short mid-write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(papermill, "execute_notebook", fills_the_disk)
    with pytest.raises(course.NotebookFailed) as error:
        course.run_course("tiny", run_dir, only=["01"])
    assert held["reserve"] == files.SPACE_RESERVE_BYTES
    assert "is full" in str(error.value) and "summary.json says so" in str(error.value)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]["message"]
    executed = nbformat.read(run_dir / "notebooks" / "01_setup.ipynb", as_version=4)
    assert "could not be written whole" in executed.cells[0].source and "No space left" in executed.cells[0].source
    assert len(executed.cells) == 1 + len(nbformat.read(course.course_notebooks(["01"])[0], as_version=4).cells)
    assert (run_dir / "notebooks" / "01_setup.ipynb.cut-short").read_text().startswith('{"cells"')
    assert not (run_dir / files.SPACE_RESERVE).exists()


def test_a_valid_executed_notebook_is_left_as_it_is(tmp_path):
    executed = tmp_path / "01_setup.ipynb"
    source = course.course_notebooks(["01"])[0]
    executed.write_bytes(source.read_bytes())
    assert course.repair_executed_notebook(source, executed, RuntimeError("x")) is None
    assert executed.read_bytes() == source.read_bytes()
