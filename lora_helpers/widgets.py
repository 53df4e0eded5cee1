"""An interactive LoRA explorer for notebook 03: rank, alpha and targets -> trainable parameters.

Built with ipywidgets; under papermill (no front end) the widget renders as
text, and notebook 03 prints its first result, so the notebook still runs end to end.
"""

from __future__ import annotations

from lora_helpers import lora


def describe_choice(model, r: int, alpha: int, targets: list[str]) -> str:
    """One line: trainable parameters, share of the base model, and the scaling alpha / r."""
    count = lora.lora_parameter_count(model, r, targets)
    share = 100 * count / lora.base_parameter_count(model)
    return f"r={r}, alpha={alpha}: {count:,} trainable parameters ({share:.3f}% of the base), scaling alpha/r = {alpha / r:g}"


def lora_explorer(model, target_choices: dict[str, list[str]]):
    """Sliders for rank and alpha and a menu of target sets; returns the widget to display.

    The result is a ``Label`` whose text the controls update: no ``Output`` widget, whose output capture can
    stall a notebook executed without a front end (papermill, nbclient).
    """
    import ipywidgets as widgets

    rank = widgets.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128], value=8, description="rank r")
    alpha = widgets.IntSlider(value=16, min=1, max=256, description="alpha")
    targets = widgets.Dropdown(options=list(target_choices), description="targets")
    result = widgets.Label()

    def update(_=None):
        result.value = describe_choice(model, rank.value, alpha.value, target_choices[targets.value])

    for control in (rank, alpha, targets):
        control.observe(update, names="value")
    update()
    return widgets.VBox([rank, alpha, targets, result])
