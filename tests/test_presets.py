import json

import pytest

from lora_helpers import presets


def test_every_preset_is_valid():
    for name, settings in presets.PRESETS.items():
        assert settings.preset == name
        presets.check_settings(settings)


def test_gpu_presets_are_sized_for_a_t4():
    for name, s in presets.PRESETS.items():
        if name.startswith("tiny") or name == "smollm2-135m":  # the CPU presets (a T4 runs smollm2 unchanged)
            continue
        assert s.load_in_4bit and s.gradient_checkpointing, name
        assert s.optim == "paged_adamw_32bit", name
        assert s.per_device_train_batch_size * s.max_length <= 1024, name  # tokens in memory per step


def test_the_readme_tells_the_presets_as_they_are():
    """The README's preset table and its Sources table against the code (they drift otherwise)."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("## Presets") : readme.index("## Running one notebook")]
    sources = readme[readme.index("## Sources") :]
    for name, settings in presets.PRESETS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        if not name.startswith("tiny-"):  # the twins' row says "as `tiny`"
            assert f"r={settings.lora_r}, α={settings.lora_alpha}" in row, name
            assert settings.source in row, name
        assert f"| {settings.source.removesuffix(', scaled down')} |" in sources, name


def test_overrides_apply_and_strings_are_coerced():
    s = presets.resolve_settings("tiny", lora_r="4", learning_rate="1e-3", load_in_4bit="false", model_id=None)
    assert (s.lora_r, s.learning_rate, s.load_in_4bit, s.model_id) == (4, 1e-3, False, "tiny")


def test_wrong_type_names_the_parameter():
    with pytest.raises(TypeError, match="lora_r='abc' should be of type int"):
        presets.resolve_settings("tiny", lora_r="abc")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="llama2-7b-guanaco"):
        presets.resolve_settings("llama-99b")


@pytest.mark.parametrize(
    "override", [{"lora_r": 0}, {"lora_alpha": -1}, {"lora_dropout": 1.0}, {"target_modules": " "}]
)
def test_impossible_values_are_refused(override):
    with pytest.raises(ValueError, match=next(iter(override))):
        presets.resolve_settings("tiny", **override)


def test_run_settings_round_trip(tmp_path):
    import dataclasses

    saved = dataclasses.asdict(presets.resolve_settings("tiny", lora_r=4))
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    assert presets.load_run_settings(tmp_path).lora_r == 4


def test_missing_run_config_says_to_run_notebook_04(tmp_path):
    with pytest.raises(FileNotFoundError, match="notebook 04"):
        presets.load_run_settings(tmp_path)
