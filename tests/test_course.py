import pytest

from lora_helpers import course


def test_parse_parameters():
    assert course.parse_parameters(["lora_r=4", "learning_rate=1e-3", "load_in_4bit=false", "dataset=a.jsonl"]) == {
        "lora_r": 4,
        "learning_rate": 1e-3,
        "load_in_4bit": False,
        "dataset": "a.jsonl",
    }
    with pytest.raises(ValueError, match="name=value"):
        course.parse_parameters(["lora_r"])


def test_only_selects_notebooks():
    assert [nb.name[:2] for nb in course.course_notebooks(["04", "05"])] == ["04", "05"]
    with pytest.raises(ValueError, match="matches no notebook"):
        course.course_notebooks(["99"])


def test_unknown_parameter_fails_before_any_notebook_runs(tmp_path):
    with pytest.raises(ValueError, match="lora_rank"):
        course.run_course("tiny", tmp_path, params={"lora_rank": 4})
    assert not (tmp_path / "notebooks").exists()


def test_unknown_preset_fails_before_any_notebook_runs(tmp_path):
    with pytest.raises(ValueError, match="presets are"):
        course.run_course("llama-99b", tmp_path)


def test_a_failing_notebook_names_the_cell_and_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(
        course.NotebookFailed,
        match=r"02_quantized_load.ipynb failed in cell \[\d+\]: FileNotFoundError: No model folder at .*no-such-model",
    ):
        course.run_course("tiny", tmp_path / "run", only=["02"], params={"model_id": str(missing)})
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"status": "failed"' in summary and "FileNotFoundError" in summary


def test_a_value_of_the_wrong_type_is_refused_before_any_notebook(tmp_path):
    with pytest.raises(TypeError, match=r"Parameter load_in_4bit='maybe' should be of type bool"):
        course.run_course("tiny", tmp_path / "run", only=["02"], params={"load_in_4bit": "maybe"})
    assert not (tmp_path / "run").exists()


def test_a_hung_cell_fails_with_the_notebook_named(tmp_path, monkeypatch):
    monkeypatch.setattr(course, "TINY_CELL_TIMEOUT_S", 1)
    with pytest.raises(course.NotebookFailed, match=r"01_setup.ipynb failed in cell \[\?\]: CellTimeoutError"):
        course.run_course("tiny", tmp_path, only=["01"])
    assert '"status": "failed"' in (tmp_path / "summary.json").read_text()


def test_a_full_disk_is_reported_as_a_full_disk(tmp_path):
    """A cell that fails with ENOSPC (a checkpoint save): the message says the disk is full, and how full."""
    from papermill.exceptions import PapermillExecutionError

    error = PapermillExecutionError(
        30, 12, "trainer.train()", "OSError", "[Errno 28] No space left on device", ["OSError: [Errno 28] ..."]
    )
    (tmp_path / "run" / "notebooks").mkdir(parents=True)
    summary = {"status": "running", "notebooks": [{"name": "04_sft_training.ipynb"}]}
    failure = course.notebook_failure(
        error, summary, tmp_path / "run" / "notebooks" / "04_sft_training.ipynb", tmp_path / "no.log"
    )
    assert isinstance(failure, course.NotebookFailed) and summary["status"] == "failed"
    assert "04_sft_training.ipynb failed in cell [12]: OSError: [Errno 28] No space left on device" in str(failure)
    assert f"The disk that holds {tmp_path / 'run'} is full (" in str(failure) and "GB free now" in str(failure)
