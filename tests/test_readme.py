"""The README's two commands are the ones that work: CI runs the test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:]
    return [block.split("```")[0].strip() for block in blocks]


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_course_command_uses_the_runner_on_tiny():
    course_command = next(c for c in readme_commands() if "lora-course course" in c)
    assert "--preset tiny" in course_command and "HF_HUB_OFFLINE=1" in course_command
    assert "torch==2.13.0" in course_command


def test_readme_links_every_notebook():
    text = (ROOT / "README.md").read_text()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{notebook.name}" in text


def test_readme_badges_open_the_notebooks_of_this_repository():
    import re

    from lora_helpers import course, links

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    badges = re.findall(r"\]\((https://colab\.research\.google\.com/github/[^)]+)\)", readme)
    assert badges == [links.colab_url(nb.name) for nb in course.course_notebooks()]
