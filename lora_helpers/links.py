"""The course's links: every notebook's Colab cell, badge and links, built from the repository's name.

A notebook opened in Colab straight from GitHub finds its images, the other notebooks and the course itself only
through absolute links; they are written from ``REPOSITORY`` by ``python -m lora_helpers links``, and
tests/test_notebooks.py checks that every notebook carries them.
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_helpers import course

# The course's repository on GitHub (owner/name): the notebooks' Colab cell, badges, links and images are built from
# it, so that a notebook opened in Colab straight from GitHub finds them (tests/test_notebooks.py checks). A fork
# changes this line and runs `python -m lora_helpers links`.
REPOSITORY = "lora-course/lora-qlora-course"


def repository_url(path: str = "") -> str:
    return f"https://github.com/{REPOSITORY}" + (f"/blob/main/{path}" if path else "")


def raw_url(path: str) -> str:
    """A file of the repository as itself (images in notebooks)."""
    return f"https://raw.githubusercontent.com/{REPOSITORY}/main/{path}"


def colab_url(notebook: str) -> str:
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{notebook}"


def absolute_links(markdown: str) -> str:
    """Relative links of a notebook's markdown made absolute: other notebooks open in Colab, files on GitHub."""
    markdown = re.sub(r"\]\(\.\./images/([^)]+)\)", lambda m: f"]({raw_url('images/' + m[1])})", markdown)
    markdown = re.sub(r"\]\(\.\./([^)]+)\)", lambda m: f"]({repository_url(m[1])})", markdown)
    return re.sub(r"\]\((\d\d_[a-z_]+\.ipynb)\)", lambda m: f"]({colab_url(m[1])})", markdown)


def colab_cell() -> str:
    """Every notebook's first code cell: on Colab, install the course and keep run_dir and the model on Drive.

    It installs only ``requirements.txt`` (what the notebooks import), never the runner's or the tests' packages,
    and never a torch: Colab's own stay. With Drive mounted, ``HF_HOME`` goes there too, so the 13 GB model is
    downloaded once rather than by every notebook (it needs that much free space on Drive).
    """
    return f"""import sys

if "google.colab" in sys.modules:  # Colab only
    COURSE_REPO = "{repository_url()}"  # change this if you use a fork
    MOUNT_DRIVE = True  # keep run_dir (and the downloaded model) on Google Drive from one notebook to the next
    !test -d /content/course || git clone -q --depth 1 {{COURSE_REPO}} /content/course
    %pip install -q -r /content/course/requirements.txt  # the course's libraries; Colab's torch and widgets stay
    %pip install -q --no-deps -e /content/course
    sys.path.insert(0, "/content/course")
    if MOUNT_DRIVE:
        from google.colab import drive
        import os
        drive.mount("/content/drive")
        os.makedirs("/content/drive/MyDrive/lora-course", exist_ok=True)
        os.chdir("/content/drive/MyDrive/lora-course")
        os.environ.setdefault("HF_HOME", "/content/drive/MyDrive/lora-course/hf-cache")  # download models once
print("Python", sys.version.split()[0], "| Colab" if "google.colab" in sys.modules else "| not Colab: nothing to install")"""


def write_links(notebooks: list[Path] | None = None) -> list[Path]:
    """Rewrite the notebooks' Colab cell and links from ``REPOSITORY`` (``python -m lora_helpers links``).

    Returns the notebooks that changed. Notebooks stay stripped: only sources are touched.
    """
    import nbformat

    changed = []
    for path in notebooks or course.course_notebooks():
        nb = nbformat.read(path, as_version=4)
        before = nbformat.writes(nb)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = absolute_links(cell.source)
            elif "google.colab" in cell.source and "COURSE_REPO" in cell.source:
                cell.source = colab_cell()
        if nbformat.writes(nb) != before:
            nbformat.write(nb, path)
            changed.append(path)
    return changed
