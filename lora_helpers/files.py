"""Saving without losing work: atomic directory writes, no silent overwrite, enough disk first.

Used by notebooks 04 (adapter) and 05 (merged model), and by the course runner.
A save goes to a temporary directory beside its destination and is renamed into
place only once complete, so an interrupted save (a Colab disconnect, a full
disk) leaves the previous version as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# What a finished run leaves; a run_dir holding any of these is not written over without overwrite=True.
FINISHED_RUN_MARKERS = ("adapter", "merged", "eval.json")


@contextlib.contextmanager
def atomic_dir(destination: str | Path):
    """Yield a temporary directory; on success it replaces ``destination``, on error it is removed."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        destination.rename(old)
    tmp.rename(destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_to_overwrite(run_dir: str | Path, overwrite: bool, names=FINISHED_RUN_MARKERS) -> None:
    """Stop before any work when ``run_dir`` already holds one of ``names`` and ``overwrite`` is not set."""
    found = [name for name in names if (Path(run_dir) / name).exists()]
    if found and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds the results of a finished run ({', '.join(found)}). "
            "Choose another run_dir, or pass overwrite=True (runner: --overwrite; papermill: -p overwrite True) "
            "to replace them."
        )


def check_free_space(directory: str | Path, needed_bytes: int, what: str) -> None:
    """Fail with the numbers when ``directory``'s disk has less free space than ``needed_bytes`` (+10%)."""
    directory = Path(directory)
    probe = directory if directory.exists() else directory.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.1:
        raise OSError(
            f"Not enough disk space to write {what}: it needs about {needed_bytes / 2**30:.2f} GB, "
            f"and {probe} has {free / 2**30:.2f} GB free. Free some space or choose a run_dir on a larger disk."
        )


def read_json(path: str | Path, missing=None):
    """The JSON in ``path``, or ``missing`` when there is no such file (a run that stopped before writing it)."""
    import json

    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else missing


def write_json(path: str | Path, content) -> Path:
    """Write JSON through a temporary file and an atomic rename: readers see the old file or the new, never half."""
    import json

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def c_stderr_to(path: str | Path):
    """Send what a C library writes to stderr into ``path`` while the block runs.

    Both ways in: file descriptor 2 (what C code writes directly) and ``sys.stderr`` (llama-cpp-python forwards
    llama.cpp's log through a Python callback). Used for llama.cpp's per-tensor quantization log.
    """
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as raw, open(path, "a", encoding="utf-8") as text:
        os.dup2(raw.fileno(), 2)
        try:
            with contextlib.redirect_stderr(text):
                yield Path(path)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
