from lora_helpers import lora, widgets


def test_explorer_builds_and_reports_the_closed_form(tiny_model_4bit):
    choices = lora.standard_target_choices(tiny_model_4bit)
    box = widgets.lora_explorer(tiny_model_4bit, choices)
    rank, alpha, targets, output = box.children
    rank.value, targets.value = 4, list(choices)[0]
    expected = lora.lora_parameter_count(tiny_model_4bit, 4, choices[targets.value])
    assert f"{expected:,} trainable" in widgets.describe_choice(tiny_model_4bit, 4, alpha.value, choices[targets.value])
