from lora_helpers import plots

HISTORY = [
    {"loss": 3.0, "learning_rate": 2e-4, "step": 5},
    {"loss": 2.0, "learning_rate": 1e-4, "step": 10},
    {"eval_loss": 2.5, "step": 10},
    {"train_loss": 2.5, "step": 10},
]


def test_loss_curves_from_log_history():
    assert plots.loss_curves(HISTORY) == {
        "train": [(5, 3.0), (10, 2.0)],
        "eval": [(10, 2.5)],
        "learning_rate": [(5, 2e-4), (10, 1e-4)],
    }


def test_plot_loss_writes_a_png(tmp_path):
    fig = plots.plot_loss(HISTORY, tmp_path / "loss.png")
    assert len(fig.axes) == 2  # loss (with eval perplexity) above, learning rate below
    assert any("perplexity" in t.get_text() for t in fig.axes[0].texts)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_course_images_are_drawn(tmp_path):
    paths = plots.draw_course_images(tmp_path)
    assert [p.name for p in paths] == ["lora_diagram.png", "peft_comparison.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_memory_chart():
    fig = plots.plot_memory(
        {"Llama-2-7B": {"16-bit": 12.6, "8-bit": 6.7, "4-bit NF4": 3.6}, "tiny": {"16-bit": 0.002, "4-bit NF4": 0.001}}
    )
    big, small = fig.axes
    assert len(big.patches) == 3 and big.get_ylabel() == "weights (GB)" and big.get_lines()  # the 15 GB line
    assert small.get_ylabel() == "weights (MB)" and not small.get_lines()
    assert [t.get_text() for t in small.texts] == ["2.05 MB", "1.02 MB"]
