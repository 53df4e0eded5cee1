"""Static checks on every notebook, without running it (the chain test runs them)."""

import ast
from pathlib import Path

import nbformat
import papermill
import pytest
from IPython.core.inputtransformer2 import TransformerManager

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = [
    "01_setup",
    "02_quantized_load",
    "03_lora_config",
    "04_sft_training",
    "05_merge",
    "06_inference",
    "07_multi_gpu",
    "08_experiments",
]
# Every parameter a test or the README passes with -p, by notebook.
PASSED = {
    "01_setup": {"preset", "run_dir"},
    "02_quantized_load": {"preset", "run_dir", "load_in_4bit"},
    "03_lora_config": {"preset", "run_dir", "lora_r", "target_modules"},
    "04_sft_training": {
        "preset",
        "run_dir",
        "trainer_route",
        "num_train_epochs",
        "lora_r",
        "dataset",
        "target_modules",
    },
    "05_merge": {"run_dir", "merge_tolerance"},
    "06_inference": {"run_dir", "run_lm_eval"},
    "07_multi_gpu": {"preset", "run_dir"},
    "08_experiments": {"run_dir", "epochs_per_point", "use_replay", "general_questions"},
}


def test_the_eight_lessons_are_there():
    assert [nb.stem for nb in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_and_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    ids = [cell.id for cell in nb.cells]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate cell ids"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: commit notebooks stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_literals(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    parameters = ast.parse(tagged[0].source).body
    for node in parameters:
        assert isinstance(node, ast.AnnAssign), f"{path.name}: parameters need a type hint each"
        assert isinstance(node.value, ast.Constant), f"{path.name}: parameters must be literals"
    for line in tagged[0].source.splitlines():
        assert "#" in line, f"{path.name}: every parameter needs a comment: {line}"
    # papermill reads them with a regex, not Python: an "=" in a comment hides the parameter from `-p NAME=...`
    names = [node.target.id for node in parameters]
    assert list(papermill.inspect_notebook(str(path))) == names, f"{path.name}: papermill cannot read every parameter"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_passed_parameters_exist(path):
    declared = set(papermill.inspect_notebook(str(path)))
    assert PASSED[path.stem] <= declared


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_code_cell_parses(path):
    nb = nbformat.read(path, as_version=4)
    transform = TransformerManager().transform_cell  # turns !shell and %magic lines into Python
    for cell in nb.cells:
        if cell.cell_type == "code":
            ast.parse(transform(cell.source))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lesson_shape(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert "colab.research.google.com" in first.source and "**You will be able to:**" in first.source
    assert "**Time:**" in first.source and "**Writes:**" in first.source
    assert any("## Try it" in c.source for c in nb.cells if c.cell_type == "markdown")
    code = [c for c in nb.cells if c.cell_type == "code"]
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    assert len(markdown) >= len(code) * 0.6, f"{path.name}: a lesson explains more than it codes"
    lengths = sorted(len(c.source.splitlines()) for c in code)
    assert lengths[len(lengths) // 2] <= 10, f"{path.name}: the median code cell is longer than 10 lines"
    assert "google.colab" in code[0].source  # the Colab install cell comes first


def test_no_machine_paths_or_tokens_in_notebooks():
    for path in NOTEBOOKS:
        text = path.read_text()
        assert "/root/" not in text and "/tmp/" not in text and "/work/" not in text
        assert "hf_" not in text.replace("hf_hub", "")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_and_links_are_written_from_the_repository(path):
    """A notebook opened in Colab from GitHub has no repository beside it: every link and image is absolute."""
    from lora_helpers import links

    nb = nbformat.read(path, as_version=4)
    assert nb.cells[2].source == links.colab_cell()  # the same cell in every notebook
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            assert links.absolute_links(cell.source) == cell.source, f"{path.name}: run python -m lora_helpers links"
            assert "](../" not in cell.source
    assert links.colab_url(path.name) in nb.cells[0].source  # its own badge


def test_colab_installs_only_what_the_notebooks_import():
    from lora_helpers import links

    root = Path(__file__).parent.parent
    needed = (root / "requirements.txt").read_text()
    for package in ("papermill", "ipykernel", "ipywidgets", "pytest", "nbformat"):
        assert package not in needed, package  # runner and test tools; Colab has its own kernel and widgets
    assert "torch==" not in needed  # never replace Colab's torch
    cell = links.colab_cell()
    assert "-r /content/course/requirements.txt" in cell and "--no-deps -e /content/course" in cell
    assert 'os.environ.setdefault("HF_HOME", "/content/drive/' in cell
    pyproject = (root / "pyproject.toml").read_text()
    assert '["requirements.txt", "requirements-runner.txt"]' in pyproject  # pip install -e . gets the runner too
