import peft.peft_model
import pytest
from peft import LoraConfig, get_peft_model

from lora_helpers import course, files


def test_atomic_dir_replaces_the_destination_when_complete(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "old.txt").write_text("old")
    with files.atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["new.txt"]
    assert (tmp_path / "adapter").stat().st_mode & 0o055 == 0o055 & ~_umask()  # readable like any folder
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind


def test_a_save_failing_half_way_leaves_the_previous_adapter_intact(tmp_path, tiny_model_4bit, monkeypatch):
    model = get_peft_model(tiny_model_4bit, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    adapter_dir = tmp_path / "adapter"
    with files.atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp)
    before = {p.name: p.read_bytes() for p in adapter_dir.iterdir()}

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a truncated file, as when a disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_written)  # the function peft writes with
    with pytest.raises(OSError, match="No space left"):
        with files.atomic_dir(adapter_dir) as tmp:
            model.save_pretrained(tmp)
    assert {p.name: p.read_bytes() for p in adapter_dir.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_finished_run_is_not_overwritten(tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        files.refuse_to_overwrite(tmp_path, overwrite=False)
    files.refuse_to_overwrite(tmp_path, overwrite=True)
    files.refuse_to_overwrite(tmp_path, overwrite=False, names=["merged"])


def test_the_runner_refuses_before_running_any_notebook(tmp_path):
    (tmp_path / "merged").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        course.run_course("tiny", tmp_path)
    assert not (tmp_path / "notebooks").exists()


def test_not_enough_disk_space_gives_the_numbers(tmp_path):
    with pytest.raises(OSError, match=r"needs about .* GB, and .* has .* GB free"):
        files.check_free_space(tmp_path, 10**18, "the merged model")
    files.check_free_space(tmp_path, 1000, "a small file")


def test_write_json_keeps_the_old_file_when_the_new_content_fails(tmp_path):
    files.write_json(tmp_path / "summary.json", {"status": "ok"})
    with pytest.raises(TypeError):
        files.write_json(tmp_path / "summary.json", {"status": object()})
    assert (tmp_path / "summary.json").read_text() == '{\n  "status": "ok"\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
