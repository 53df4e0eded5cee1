"""Notebook 08's grid: each LoRA variant really changes what peft builds, and a point trains, measures and leaves
the base as it found it."""

import pytest
import torch
from peft import get_peft_model

from lora_helpers import experiments, lora, models, presets, training

ALL_POINTS = {point["name"]: point for grid in experiments.GRIDS.values() for point in grid}


@pytest.fixture()
def base16(tiny_dir):
    return models.load_model("tiny", load_in_4bit=False)  # PiSSA and OLoRA need a 16-bit (or fp32) base


def build(base, point):
    settings = presets.get_preset("tiny")
    return get_peft_model(base, experiments.point_lora_config(settings, point, base))


def first_lora_layer(net):
    return net.base_model.model.model.layers[0].self_attn.v_proj


def test_each_variant_changes_what_peft_builds(tiny_dir):
    fresh = lambda: models.load_model("tiny", load_in_4bit=False)  # noqa: E731 (PiSSA and OLoRA rewrite the base)
    original = fresh().model.layers[0].self_attn.v_proj.weight.detach().clone()
    plain = build(fresh(), ALL_POINTS["preset"])
    layer = first_lora_layer(plain)
    assert layer.scaling["default"] == 32 / 16 and not layer.use_dora["default"]
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # default init: B = 0, the model unchanged

    assert first_lora_layer(build(fresh(), ALL_POINTS["rsLoRA"])).scaling["default"] == pytest.approx(32 / 16**0.5)
    dora = build(fresh(), ALL_POINTS["DoRA"])
    assert first_lora_layer(dora).use_dora["default"]
    assert any("lora_magnitude_vector" in name for name, _ in dora.named_parameters())
    for name in ("PiSSA", "OLoRA"):
        layer = first_lora_layer(build(fresh(), ALL_POINTS[name]))
        assert torch.count_nonzero(layer.lora_B["default"].weight) > 0, name  # B starts from the weight, not 0
        assert not torch.equal(layer.base_layer.weight, original), name  # the base keeps the residual

    assert first_lora_layer(build(fresh(), ALL_POINTS["r=4"])).lora_A["default"].weight.shape[0] == 4
    qv = build(fresh(), ALL_POINTS["q,v only"])
    assert sorted(qv.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    assert experiments.trainable_parameters(qv) < experiments.trainable_parameters(plain)


def test_a_point_trains_measures_and_restores_the_base(base16, tiny_dir):
    settings = presets.resolve_settings("tiny", load_in_4bit=False, num_train_epochs=4, replay="")
    tokenizer = models.load_tokenizer("tiny", chat_format=settings.chat_format)
    prepared = training.prepare_datasets(settings, tokenizer)
    before = {k: v.clone() for k, v in base16.state_dict().items()}
    result = experiments.run_point(
        base16, tokenizer, settings, ALL_POINTS["PiSSA"], prepared.train, prepared.eval, prepared.split, [0, 1]
    )
    assert result["steps"] == 4 * 6 and result["trainable_parameters"] > 0 and result["seconds"] > 0
    assert result["loss_curve"][-1][1] < result["loss_curve"][0][1]
    assert 0 <= result["exact_match_train"] <= 1 and len(result["general_correct"]) == 2
    after = base16.state_dict()
    assert not hasattr(base16, "peft_config") and all(torch.equal(before[k], after[k]) for k in before)


def test_rewriting_initialisations_are_skipped_on_a_4bit_base(tiny_model_4bit):
    result = experiments.run_point(
        tiny_model_4bit, None, presets.get_preset("tiny"), ALL_POINTS["PiSSA"], None, None, {}, []
    )
    assert result["skipped"].startswith("skipped: PiSSA and OLoRA")


def test_a_point_that_diverges_is_kept_as_stopped_and_the_grid_goes_on(base16, tiny_dir):
    settings = presets.resolve_settings("tiny", load_in_4bit=False, num_train_epochs=2, replay="")
    tokenizer = models.load_tokenizer("tiny", chat_format=settings.chat_format)
    prepared = training.prepare_datasets(settings, tokenizer)
    before = {k: v.clone() for k, v in base16.state_dict().items()}
    point = {"name": "lr=1e9", "learning_rate": 1e9}
    result = experiments.run_point(base16, tokenizer, settings, point, prepared.train, None, prepared.split, [0])
    assert result["skipped"].startswith("stopped: Training stopped at step") and result["settings"] == {
        "learning_rate": 1e9
    }
    after = base16.state_dict()
    assert not hasattr(base16, "peft_config") and all(torch.equal(before[k], after[k]) for k in before)
    assert experiments.table_rows([result]) == []  # the table and plots leave it out


def test_a_grid_leaves_out_points_that_change_nothing_in_this_run():
    smollm2 = presets.get_preset("smollm2-135m")  # r=8, dropout 0.1: "r=8" and "dropout 0.1" would repeat it
    left_out = {p["name"] for p in experiments.GRIDS["full"]} - {
        p["name"] for p in experiments.grid_points("full", smollm2)
    }
    assert left_out == {"r=8", "dropout 0.1"}
    for preset in ("tiny", "smollm2-135m"):
        assert experiments.grid_points("ci", presets.get_preset(preset)) == experiments.GRIDS["ci"]


def test_pad_is_eos_masks_every_eos_in_the_labels_the_course_pad_none(tiny_dir, tmp_path):
    """The full grid's "Trainer route, pad = eos" point: the language-modelling collator masks pad tokens in the
    labels, so with pad_token = eos_token no EOS is ever trained (the model is never taught to stop)."""
    settings = presets.resolve_settings("tiny", load_in_4bit=False, replay="")
    tokenizer = models.load_tokenizer("tiny", chat_format=settings.chat_format)
    train = training.prepare_datasets(settings, tokenizer).train.select(range(4))
    model = models.load_model("tiny", load_in_4bit=False)
    args = training.sft_config(settings, tmp_path, False, save_strategy="no")
    trained_eos = {}
    for pad_is_eos in (False, True):
        trainer = experiments.lm_collator_trainer(model, tokenizer, args, train, None, pad_is_eos)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        real = batch["attention_mask"] == 1
        eos = (batch["input_ids"] == tokenizer.eos_token_id) & real
        assert eos.sum() >= 4  # each example ends its answer with EOS
        trained_eos[pad_is_eos] = int((batch["labels"][eos] != -100).sum()) / int(eos.sum())
    assert trained_eos == {False: 1.0, True: 0.0}
    assert tokenizer.pad_token != tokenizer.eos_token  # the mistake stayed in its point


def test_eva_initialises_from_the_training_batches_and_moves_ranks(base16, tiny_dir):
    """EVA (full grid): A from the top directions of each layer's inputs on the point's own training batches; with
    peft's default rho=2 the ranks move between layers, so the adapter differs in size from the preset's."""
    settings = presets.resolve_settings("tiny", load_in_4bit=False, num_train_epochs=2, replay="")
    tokenizer = models.load_tokenizer("tiny", chat_format=settings.chat_format)
    prepared = training.prepare_datasets(settings, tokenizer)
    before = {k: v.clone() for k, v in base16.state_dict().items()}
    points = {p["name"]: p for p in experiments.GRIDS["full"]}
    args = (base16, tokenizer, settings)
    rest = (prepared.train, None, {"train": prepared.split["train"][:4]}, [0])  # few questions asked: faster
    plain, eva = (experiments.run_point(*args, points[name], *rest) for name in ("preset", "EVA"))
    assert "skipped" not in eva and eva["loss_curve"][-1][1] < eva["loss_curve"][0][1]
    assert eva["trainable_parameters"] != plain["trainable_parameters"]  # measured on tiny: 66,688 against 65,536
    after = base16.state_dict()
    assert not hasattr(base16, "peft_config") and all(torch.equal(before[k], after[k]) for k in before)


def test_loftq_starts_the_adapter_from_the_4bit_rounding_error(tiny_model_4bit, tiny_dir):
    """LoftQ (full grid): on a 4-bit base the adapter starts as the best rank-r fit of what NF4 rounding took from
    each weight, so base + adapter starts closer to the full-precision layers; the point then trains as usual."""
    settings = presets.resolve_settings("tiny", num_train_epochs=2, replay="")
    net = build(tiny_model_4bit, ALL_POINTS["LoftQ"])
    fitted = lora.loftq_initialise(net)
    layer = first_lora_layer(net)
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0  # B no longer starts at zero
    # Measured on tiny (r=16, alpha=32): 4.99 -> 4.06 over the adapted layers.
    assert fitted["rounding_error_after"] < 0.9 * fitted["rounding_error_before"]
    full = models.load_model("tiny", load_in_4bit=False).model.layers[0].self_attn.v_proj.weight.float()
    x = torch.randn(8, full.shape[1])
    with torch.no_grad():
        with net.disable_adapter():
            off = (layer(x) - x @ full.T).norm()
        on = (layer(x) - x @ full.T).norm()
    assert on < off  # the layer's outputs moved toward the full-precision layer's
    net.unload()

    tokenizer = models.load_tokenizer("tiny", chat_format=settings.chat_format)
    prepared = training.prepare_datasets(settings, tokenizer)
    rest = (prepared.train, None, {"train": prepared.split["train"][:4]}, [0])
    result = experiments.run_point(tiny_model_4bit, tokenizer, settings, ALL_POINTS["LoftQ"], *rest)
    assert "skipped" not in result and result["loss_curve"][-1][1] < result["loss_curve"][0][1]
    assert result["rounding_error_after"] < result["rounding_error_before"]
    assert result["adapter_dtype"] == "float32"  # trl casts a 4-bit base's adapters to bf16: cast back
    assert not hasattr(tiny_model_4bit, "peft_config")


def test_loftq_is_skipped_on_a_16bit_base(base16):
    result = experiments.run_point(base16, None, presets.get_preset("tiny"), ALL_POINTS["LoftQ"], None, None, {}, [])
    assert result["skipped"].startswith("skipped: LoftQ")
