"""Plotting helpers (matplotlib), kept out of the notebooks so the lessons show the fine-tuning code.

Used by notebook 02 (memory bars), notebook 04 (loss curves), notebook 06 (learning against forgetting) and ``python -m
lora_helpers images``, which redraws the diagrams in ``images/``.
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot, drawing off-screen (Agg) outside notebooks."""
    import matplotlib

    if not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


def loss_curves(log_history: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) pairs of training loss, eval loss and learning rate from ``trainer.state.log_history``."""
    curves = {"train": [], "eval": [], "learning_rate": []}
    for entry in log_history:
        if "loss" in entry:
            curves["train"].append((entry["step"], entry["loss"]))
        if "eval_loss" in entry:
            curves["eval"].append((entry["step"], entry["eval_loss"]))
        if "learning_rate" in entry:
            curves["learning_rate"].append((entry["step"], entry["learning_rate"]))
    return curves


def plot_loss(log_history: list[dict], path: str | Path | None = None):
    """Training and eval loss (with eval perplexity) and the learning rate against steps; saved to ``path``."""
    import math

    plt = pyplot()
    curves = loss_curves(log_history)
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(6.5, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if curves["train"]:
        ax.plot(*zip(*curves["train"]), "-", label="train loss")
    if curves["eval"]:
        steps, values = zip(*curves["eval"])
        ax.plot(steps, values, "o--", label="eval loss")
        ax.annotate(
            f"eval perplexity {math.exp(values[-1]):.3g}",
            (steps[-1], values[-1]),
            textcoords="offset points",
            xytext=(-10, 8),
            ha="right",
            fontsize=8,
        )
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss during fine-tuning")
    ax.legend()
    ax.grid(alpha=0.3)
    if curves["learning_rate"]:
        lr_ax.plot(*zip(*curves["learning_rate"]), color="gray")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_lengths(lengths: list[int], max_length: int, path: str | Path | None = None):
    """Histogram of tokens per example, with ``max_length`` marked and the share beyond it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="#5b8def")
    share = sum(n > max_length for n in lengths) / len(lengths)
    ax.axvline(max_length, color="crimson", linestyle="--", label=f"max_length={max_length} ({share:.0%} beyond)")
    ax.set_xlabel("tokens per example (prompt + answer)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_learning_vs_forgetting(rows: dict[str, dict], path: str | Path | None = None):
    """Notebook 06: per model, exact match on the trained questions beside retention of general knowledge, and the
    loss on the general text (forgetting is its rise over the base's). ``rows``: name -> {"exact match",
    "retention", "general-text loss"}; a missing retention (a base that knows nothing) is drawn as 0."""
    plt = pyplot()
    names = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(names))
    for offset, key, color in ((-0.2, "exact match", "#5b8def"), (0.2, "retention", "#3aa76d")):
        values = [rows[n][key] or 0.0 for n in names]
        bars = left.bar([i + offset for i in x], values, width=0.4, color=color, label=key)
        left.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=8)
    left.set_xticks(list(x), names)
    left.set_ylim(0, 1.3)
    left.set_ylabel("share")
    left.legend(loc="upper center", ncols=2, fontsize=8)
    left.set_title("learned (trained questions) and kept (general knowledge)", fontsize=9)
    losses = [rows[n]["general-text loss"] for n in names]
    bars = right.bar(list(x), losses, color="#c97b3a")
    right.bar_label(bars, labels=[f"{v:.3f}" for v in losses], fontsize=8)
    right.set_xticks(list(x), names)
    right.set_ylabel("loss (nats per token)")
    right.set_title("loss on a general text: lower is better", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_experiment_losses(points: list[dict], path: str | Path | None = None):
    """Notebook 08: the training loss of every point of the grid against its step, one line per setting."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for point in points:
        if point.get("loss_curve"):
            steps, losses = zip(*point["loss_curve"])
            ax.plot(steps, losses, marker=".", linewidth=1, label=point["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncols=2)
    ax.set_title("the same data and steps, one setting changed at a time", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_experiment_tradeoffs(points: list[dict], path: str | Path | None = None):
    """Notebook 08: exact match on the trained questions against retention of general knowledge (when the base
    knew any), against trainable parameters, and against seconds; each point labelled with its setting."""
    plt = pyplot()
    panels = [("trainable_parameters", "trainable parameters", True), ("seconds", "seconds of training", False)]
    if any(p.get("retention") is not None for p in points):
        panels.insert(0, ("retention", "retention of general knowledge", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, label, log) in zip(axes[0], panels):
        for i, point in enumerate(points):
            if point.get(key) is None:
                continue
            ax.scatter(point[key], point["exact_match_train"], color=f"C{i % 10}")
            ax.annotate(
                point["name"],
                (point[key], point["exact_match_train"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
        ax.set_xlabel(label)
        ax.set_ylabel("exact match, trained questions")
        ax.set_ylim(-0.05, 1.1)
        if log:
            ax.set_xscale("log")
    axes[0][0].set_title("learned against kept: up and right is better" if len(panels) == 3 else "", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_harness_scores(table: dict[str, dict[str, float]], path: str | Path | None = None):
    """Notebook 06: lm-evaluation-harness scores per model (``harness.scores``): the multiple-choice accuracies side
    by side (the dashed line is chance, one in four), and the general text's word perplexity (lower is better)."""
    plt = pyplot()
    names = list(table)
    tasks = [task for task in table[names[0]] if task != "course_general_text"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [table[name][task] for task in tasks]
        bars = left.bar([t + (i - (len(names) - 1) / 2) * width for t in range(len(tasks))], values, width, label=name)
        left.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=7)
    left.axhline(0.25, color="grey", linestyle="--", linewidth=0.8)
    left.set_xticks(range(len(tasks)), [task.removeprefix("course_").replace("_", " ") for task in tasks], fontsize=8)
    left.set_ylim(0, 1.25)
    left.set_ylabel("accuracy")
    left.legend(loc="upper center", ncols=len(names), fontsize=8)
    left.set_title("multiple choice: does the model prefer the right answer?", fontsize=9)
    perplexity = [table[name].get("course_general_text", float("nan")) for name in names]
    bars = right.bar(range(len(names)), perplexity, color=[f"C{i}" for i in range(len(names))])
    right.bar_label(bars, labels=[f"{v:.1f}" for v in perplexity], fontsize=8)
    right.set_xticks(range(len(names)), names, fontsize=7, rotation=15)
    right.set_title("general text: word perplexity", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def loss_tokens_html(pieces: list[str], in_loss: list[bool], most: int = 300):
    """The tokens of one example, green where they count in the loss, grey where they do not.

    At most ``most`` tokens, the first and last halves: one very long example must not make a notebook of
    megabytes.
    """
    import html

    from IPython.display import HTML

    marks = list(zip(pieces, in_loss))
    if len(marks) > most:
        marks = [*marks[: most // 2], (f" … {len(marks) - most} tokens not shown … ", None), *marks[-most // 2 :]]
    spans = []
    for piece, counted in marks:
        if counted is None:
            spans.append(f"<span>{html.escape(piece)}</span>")
            continue
        colour = "#c8e6c9" if counted else "#eeeeee"
        text = html.escape(piece).replace(" ", "&nbsp;").replace("\n", "&#8629;<br>")
        spans.append(f'<span style="background:{colour};border:1px solid #ccc;margin:1px;padding:0 2px">{text}</span>')
    legend = '<p style="font-size:90%">green: in the loss &nbsp; grey: context only</p>'
    return HTML(f'<div style="font-family:monospace;line-height:1.9">{"".join(spans)}</div>{legend}')


def memory_unit(gb: float) -> tuple[str, float]:
    """("MB", 1024) below 1 GB, else ("GB", 1): the unit that makes a model's numbers readable."""
    return ("MB", 1024.0) if gb < 1 else ("GB", 1.0)


def plot_memory(panels: dict[str, dict[str, float]], limit_gb: float | None = 15):
    """Weight memory per precision (notebook 02), one panel per model, each in its own unit.

    ``panels`` maps a title to ``plan.weight_memory_gb``'s result; a panel in GB gets a line at the GPU's size.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    for ax, (title, sizes_gb) in zip(axes[0], panels.items()):
        unit, scale = memory_unit(max(sizes_gb.values()))
        values = [gb * scale for gb in sizes_gb.values()]
        bars = ax.bar(list(sizes_gb), values, color=["#9aa5b1", "#5b8def", "#2e7d32"][: len(sizes_gb)])
        ax.bar_label(bars, fmt=f"%.2f {unit}")
        if limit_gb and unit == "GB" and max(values) > limit_gb / 3:
            ax.axhline(limit_gb, color="crimson", linestyle="--", label=f"{limit_gb:g} GB GPU")
            ax.legend()
        ax.set_ylabel(f"weights ({unit})")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_plan(results: dict[str, dict]):
    """The planner's estimate as stacked bars, one per plan (notebooks 02 and 03), with lines at the GPU sizes it was checked against.

    ``results`` maps a label to ``plan.plan``'s result; each bar is drawn in GB, or in MB when all are small.
    """
    plt = pyplot()
    unit, scale = memory_unit(max(r["peak_gb"] for r in results.values()))
    gpu_sizes = sorted({size for result in results.values() for size in result["fits_gb"]})
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.9 * len(results)))
    colors = {}
    for row, (label, result) in enumerate(results.items()):
        left = 0.0
        for name, gb in result["parts_gb"].items():
            label = None if name in colors else name  # each part once in the legend, whichever plan has it first
            color = colors.setdefault(name, f"C{len(colors)}")
            ax.barh([row], [gb * scale], left=left, color=color, label=label)
            left += gb * scale
        ax.text(left, row, f" {result['peak_gb'] * scale:.2f} {unit}", va="center", fontsize=8)
    if unit == "GB":
        for size in gpu_sizes:
            if size < ax.get_xlim()[1] * 1.5:
                ax.axvline(size, color="crimson", linestyle="--")
                ax.text(size, len(results) - 0.5, f"{size} GB", color="crimson", ha="center", fontsize=8)
    ax.set_yticks(range(len(results)), list(results), fontsize=8)
    ax.set_xlabel(unit)
    ax.set_title("Estimated peak training memory")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3)
    fig.tight_layout()
    return fig


def draw_lora_diagram(path: str | Path):
    """The Llama-2 about-me recipe's LoRA diagram: frozen W beside trainable A (r x d) and B (d x r); h = Wx + (alpha/r)·BAx."""
    from matplotlib.patches import FancyArrowPatch, Rectangle

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 7)
    ax.axis("off")
    ax.add_patch(Rectangle((1.0, 2.0), 3.2, 3.2, color="#9aa5b1"))
    ax.text(2.6, 3.6, "W\n(d × k)\nfrozen", ha="center", va="center", fontsize=12)
    ax.add_patch(Rectangle((5.6, 2.0), 2.4, 0.8, color="#f4a259"))
    ax.text(6.8, 2.4, "A (r × k), trainable, random init", ha="center", va="center", fontsize=8)
    ax.add_patch(Rectangle((6.4, 3.4), 0.8, 1.8, color="#5b8def"))
    ax.text(6.8, 4.3, "B\n(d × r)\n= 0", ha="center", va="center", fontsize=8, color="white")
    for start, end in (
        ((2.6, 0.8), (2.6, 2.0)),
        ((6.8, 0.8), (6.8, 2.0)),
        ((6.8, 2.8), (6.8, 3.4)),
        ((2.6, 5.2), (4.4, 6.2)),
        ((6.8, 5.2), (5.0, 6.2)),
    ):
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="black"))
    ax.text(4.7, 0.5, "x  (input, k)", ha="center", fontsize=11)
    ax.plot([2.6, 6.8], [0.8, 0.8], color="black")
    ax.text(4.7, 6.45, "h = Wx + (α / r) · B A x", ha="center", fontsize=12, weight="bold")
    ax.text(8.3, 3.6, "r ≪ d, k\nonly A and B\nare trained", fontsize=9, va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return fig


def draw_peft_comparison(path: str | Path):
    """The Llama-2 Guanaco Colab recipe's comparison: pretraining, full fine-tuning and PEFT, by what is trained and what it costs."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    panels = [
        ("Pretraining", "all weights trained\nfrom random init\non trillions of tokens", "#c0392b", 0.0),
        ("Full fine-tuning", "all weights updated\n~16 bytes per parameter\n(weights, grads, Adam)", "#e67e22", 0.0),
        (
            "PEFT (LoRA / QLoRA)",
            "base frozen (4-bit in QLoRA)\nsmall adapters trained\n<1% of parameters",
            "#9aa5b1",
            0.22,
        ),
    ]
    for ax, (title, caption, colour, adapter) in zip(axes, panels):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.axis("off")
        ax.set_title(title, fontsize=11, weight="bold")
        for i in range(4):
            ax.add_patch(Rectangle((0.15, 0.35 + i * 0.15), 0.5, 0.12, color=colour))
            if adapter:
                ax.add_patch(Rectangle((0.7, 0.35 + i * 0.15), 0.12, 0.12, color="#2e7d32"))
        ax.text(0.5, 0.12, caption, ha="center", va="center", fontsize=8.5)
    axes[2].text(0.76, 0.97, "adapters", ha="center", fontsize=8, color="#2e7d32")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return fig


def draw_course_images(images_dir: str | Path = "images") -> list[Path]:
    """Redraw the diagrams the notebooks and the README show."""
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    paths = [images_dir / "lora_diagram.png", images_dir / "peft_comparison.png"]
    draw_lora_diagram(paths[0])
    draw_peft_comparison(paths[1])
    return paths
