import torch
from safetensors.torch import load_file

from lora_helpers import presets, training


def test_cpu_training_uses_fp32_and_plain_adamw():
    assert training.precision_flags() == {"fp16": False, "bf16": False}
    assert training.optimizer_for_device("paged_adamw_32bit") == "adamw_torch"
    assert training.optimizer_for_device("adamw_torch") == "adamw_torch"


def test_prepare_datasets_splits_and_formats(tiny_tokenizer):
    settings = presets.resolve_settings("tiny")
    train, evaluation, shape, raw = training.prepare_datasets(settings, tiny_tokenizer)
    assert shape == "messages"
    assert len(train) + len(evaluation) == len(raw) and len(evaluation) == 5
    assert set(train.column_names) == {"prompt", "completion"}
    assert all(c.endswith("</s>") for c in train["completion"])


def test_train_adapter_learns_and_changes_only_the_adapter(tmp_path, tiny_dir):
    settings = presets.resolve_settings(
        "tiny", dataset="package:persona_captain.jsonl", num_train_epochs=8, eval_fraction=0.0, logging_steps=1
    )
    trainer = training.train_adapter(settings, str(tmp_path / "adapter"))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapter file holds adapter weights only
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B moved away from zero
    base = load_file(tiny_dir / "model.safetensors")
    model = trainer.model
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    import bitsandbytes.functional as bnbf

    restored = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    original = base["model.layers.0.self_attn.q_proj.weight"]
    assert (restored - original).abs().max() < 0.2 * original.abs().max()  # still the NF4 copy of the frozen base
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
