"""Saving without losing work: atomic directory writes, no silent overwrite, enough disk first.

Used by notebooks 04 (adapter) and 05 (merged model), and by the course runner.
A save goes to a temporary directory beside its destination and is renamed into
place only once complete, so an interrupted save (a Colab disconnect, a full
disk) leaves the previous version as it was; the next save removes what such an
interruption left behind. One process at a time writes a run directory
(``lock_run_dir``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# What a finished run leaves; a run_dir holding any of these is not written over without overwrite=True.
FINISHED_RUN_MARKERS = ("adapter", "merged", "eval.json")
LOCK_NAME = ".lock"
LOCK_OWNER_ENV = "LORA_COURSE_LOCK_OWNER"  # the runner's pid: its notebooks' kernels share its lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunDirLock:
    """``run_dir/.lock``: who writes this run directory (pid, host, what, since when)."""

    def __init__(self, path: Path, owned: bool):
        self.path, self.owned = path, owned

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False


def lock_run_dir(run_dir: str | Path, what: str):
    """Claim ``run_dir`` for this process, or refuse at once naming the process that writes it.

    A lock left by a process that has died on this machine is released; one from another machine (a Colab runtime
    that is gone, with run_dir on Drive) is taken over with a warning, because there is no way to ask it. The
    course runner's kernels run under the runner's lock. Released at exit, or with ``.release()``.
    """
    import atexit
    import datetime
    import json
    import socket
    import warnings

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "what": what,
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    for _ in range(3):
        try:
            with open(path, "x") as handle:
                json.dump(me, handle)
            lock = RunDirLock(path, owned=True)
            atexit.register(lock.release)
            return lock
        except FileExistsError:
            pass
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):  # half-written by a process that died at that moment
            path.unlink(missing_ok=True)
            continue
        if other.get("host") == me["host"] and other.get("pid") == me["pid"]:
            return RunDirLock(path, owned=True)  # this process already holds it (a notebook's cells run again)
        if str(other.get("pid")) == os.environ.get(LOCK_OWNER_ENV) and other.get("host") == me["host"]:
            return RunDirLock(path, owned=False)  # the course runner that started this kernel holds it
        if other.get("host") == me["host"] and _alive(int(other.get("pid", 0))):
            raise RuntimeError(
                f"{run_dir} is being written by another process: {other.get('what')} (pid {other.get('pid')}, "
                f"since {other.get('since')}). Two runs into one run_dir would mix their files: wait for it to "
                "finish, or choose another run_dir. (A notebook left open in Jupyter holds it until its last cell "
                "runs or its kernel is shut down.)"
            )
        if other.get("host") != me["host"]:
            warnings.warn(
                f"{run_dir} was locked by {other.get('what')} on another machine ({other.get('host')}, since "
                f"{other.get('since')}); taking it over, as that machine cannot be asked (a Colab runtime that is "
                "gone?). Make sure it is not still running.",
                stacklevel=2,
            )
        path.unlink(missing_ok=True)  # a dead process's lock
    raise RuntimeError(f"Could not lock {run_dir}: {path} keeps coming back. Is another process starting there?")


@contextlib.contextmanager
def atomic_dir(destination: str | Path):
    """Yield a temporary directory; on success it replaces ``destination``, on error it is removed."""
    destination = Path(destination)
    if destination.is_symlink():
        raise OSError(
            f"{destination} is a symbolic link (to {os.readlink(destination)}). A save goes into a new folder that "
            "is renamed into place, which would replace the link by a folder on this disk. Remove the link; to keep "
            "a run on another disk, make the whole run_dir live there (or link run_dir itself)."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    clean_up_interrupted_save(destination)
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


SPACE_RESERVE = ".space-reserve"
SPACE_RESERVE_BYTES = 8 * 2**20  # summary.json and a repaired executed notebook need far less


def reserve_space(run_dir: str | Path) -> Path:
    """Hold a few megabytes of ``run_dir``'s disk in a hidden file while the course runs (the runner).

    If the disk fills during a notebook, ``release_space`` frees them, so that ``summary.json`` and a valid
    executed notebook can still be written: the run's failure is recorded, not replaced by a second one.
    """
    path = Path(run_dir) / SPACE_RESERVE
    try:
        with open(path, "wb") as handle:
            handle.write(bytes(SPACE_RESERVE_BYTES))  # real blocks: a sparse file would reserve nothing
    except OSError:
        path.unlink(missing_ok=True)  # already full: the run's own first write will say so
    return path


def release_space(run_dir: str | Path) -> None:
    (Path(run_dir) / SPACE_RESERVE).unlink(missing_ok=True)


def clean_up_interrupted_save(destination: str | Path) -> list[Path]:
    """Remove what an interrupted ``atomic_dir`` save of ``destination`` left: its ``.partial-*`` folder (up to a
    whole 13 GB model) and, when the new version was already in place, the ``.old-*`` one. When the save died
    between its two renames, the ``.old-*`` folder is the previous version: it is put back. Returns what was
    removed, each also printed."""
    destination = Path(destination)
    removed = []
    for old in sorted(destination.parent.glob(f".{destination.name}.old-*")):
        if not destination.exists():
            old.rename(destination)  # the previous version, whole: back in its place
            print(f"restored {destination.name} from an interrupted save")
            continue
        removed.append(old)
    removed += sorted(destination.parent.glob(f".{destination.name}.partial-*"))
    for leftover in removed:
        size = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file()) / 2**30
        shutil.rmtree(leftover, ignore_errors=True)
        print(f"removed {leftover.name}, left by an interrupted save ({size:.2f} GB)")
    return removed


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


def cache_root() -> Path:
    """Where the course caches what it builds (models, replay answers): $LORA_HELPERS_CACHE, else
    ~/.cache/lora_helpers."""
    return Path(os.environ.get("LORA_HELPERS_CACHE", Path.home() / ".cache" / "lora_helpers"))


def read_json(path: str | Path, missing=None):
    """The JSON in ``path``, or ``missing`` when there is no such file (a run that stopped before writing it).

    A file that is not valid JSON (cut short by a full disk or a killed process) is named, with what to do."""
    import json

    path = Path(path)
    if not path.exists():
        return missing
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is damaged (not valid JSON: {error}); was its run stopped while writing it, or its disk full? "
            "Write it again with the notebook that makes it (overwrite=True), or remove it."
        ) from None


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
