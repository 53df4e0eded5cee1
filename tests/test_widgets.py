from lora_helpers import lora, widgets


def test_explorer_builds_and_reports_the_closed_form(tiny_model_4bit):
    choices = lora.standard_target_choices(tiny_model_4bit)
    box = widgets.lora_explorer(tiny_model_4bit, choices)
    rank, alpha, targets, result = box.children
    rank.value, targets.value = 4, list(choices)[0]  # moving a control updates the label
    expected = lora.lora_parameter_count(tiny_model_4bit, 4, choices[targets.value])
    assert f"r=4, alpha={alpha.value}: {expected:,} trainable" in result.value
