from lora_helpers import lora, widgets


def test_explorer_builds_and_reports_the_closed_form(tiny_model_4bit):
    choices = lora.standard_target_choices(tiny_model_4bit)
    box = widgets.lora_explorer(tiny_model_4bit, choices)
    rank, alpha, targets, result = box.children
    rank.value, targets.value = 4, list(choices)[0]  # moving a control updates the label
    expected = lora.lora_parameter_count(tiny_model_4bit, 4, choices[targets.value])
    assert f"r=4, alpha={alpha.value}: {expected:,} trainable" in result.value


def test_explorer_share_is_of_the_base_on_the_wrapped_model_too(tiny_model_4bit):
    """Notebook 03 shows the explorer on the peft-wrapped model: its share must equal the table's, of the base alone."""
    from peft import LoraConfig, get_peft_model

    choices = lora.standard_target_choices(tiny_model_4bit)
    row = lora.trainable_parameter_table(tiny_model_4bit, [8], choices)[0]
    wrapped = get_peft_model(tiny_model_4bit, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    line = widgets.describe_choice(wrapped, 8, 16, choices[row["targets"]])
    assert f"{row['trainable']:,} trainable parameters ({row['share_%']:.3f}% of the base)" in line
