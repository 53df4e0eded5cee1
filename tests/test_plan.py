import json

import pytest

from lora_helpers import __main__ as cli
from lora_helpers import plan, plots, presets


def closed_form(config, r, targets):
    """r * (d_in + d_out) summed over the adapted layers, from the config's numbers alone."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return layers * sum(r * sum(shapes[t]) for t in targets)


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_trainable_count_equals_the_closed_form_for_every_preset(name, tiny_dir):
    settings = presets.get_preset(name)
    result = plan.plan(settings)
    assert result["trainable"] == closed_form(plan.load_config(settings.model_id), settings.lora_r, result["targets"])


def test_known_counts():
    assert plan.plan_for_preset("llama2-7b-about-me")["trainable"] == 4_194_304  # Llama-2-7B, r=8, q,v
    # The Llama-3.2 QLoRA guide prints 6,553,600 for r=16 on all seven projections of Llama-3.2-3B; the true count is:
    assert plan.plan_for_preset("llama3.2-3b")["trainable"] == 24_313_856
    assert plan.plan_for_preset("llama3.2-3b")["parameters"] == 3_212_749_824  # tied embeddings counted once


def test_every_gpu_preset_fits_a_t4_by_the_estimate():
    for name in presets.PRESETS:
        result = plan.plan_for_preset(name)
        assert result["fits_gb"][15], (name, result["peak_gb"])


def test_checkpointing_and_4bit_shrink_the_estimate():
    base = plan.plan_for_preset("llama2-7b-guanaco", max_length=2048)
    no_ckpt = plan.plan_for_preset("llama2-7b-guanaco", max_length=2048, gradient_checkpointing=False)
    fp16 = plan.plan_for_preset("llama2-7b-guanaco", load_in_4bit=False)
    assert no_ckpt["parts_gb"]["activations"] > 5 * base["parts_gb"]["activations"]
    assert fp16["parts_gb"]["quantized weights"] > 3.5 * base["parts_gb"]["quantized weights"]


def test_a_plan_that_does_not_fit_says_what_to_change():
    result = plan.plan_for_preset(
        "llama3.1-8b", load_in_4bit=False, gradient_checkpointing=False, max_length=2048, per_device_train_batch_size=4
    )
    assert not result["fits_gb"][15]
    assert any("gradient_checkpointing" in tip for tip in result["advice"])
    assert any("load_in_4bit" in tip for tip in result["advice"])


def test_cli(capsys):
    assert cli.main(["plan", "--preset", "llama2-7b-about-me", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trainable"] == 4_194_304 and set(result["parts_gb"]) >= {"activations", "logits", "overhead"}
    assert cli.main(["plan", "--preset", "llama3.1-8b", "-p", "lora_r=32"]) == 0
    assert "27,262,976 trainable" in capsys.readouterr().out


def test_plan_chart(tiny_dir):
    fig = plots.plot_plan({"guanaco": plan.plan_for_preset("llama2-7b-guanaco"), "tiny": plan.plan_for_preset("tiny")})
    assert len(fig.axes[0].patches) == 12  # two plans of six parts each
    assert fig.axes[0].get_xlabel() == "GB"
    small = plots.plot_plan({"tiny on a CPU": plan.plan(presets.resolve_settings("tiny"), compute_bytes=4, gpu=False)})
    assert small.axes[0].get_xlabel() == "MB"  # tiny's plan in MB, not "0.00 GB"


def test_4bit_training_holds_norms_in_fp32_and_embeddings_in_the_compute_dtype(tiny_dir, monkeypatch):
    """What the planner counts for the parts never quantized: peft upcasts them all to fp32 for k-bit training,
    and the course casts the frozen embedding and head back to the compute dtype (fp16 on a T4)."""
    import torch
    from peft import prepare_model_for_kbit_training

    from lora_helpers import device, models, training

    monkeypatch.setattr(device, "compute_dtype", lambda: torch.float16)  # as on a T4
    model = models.load_model("tiny", load_in_4bit=True)
    assert model.get_input_embeddings().weight.dtype == torch.float16
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    unquantized = [p for n, p in model.named_parameters() if p.__class__.__name__ != "Params4bit"]
    assert unquantized and {p.dtype for p in unquantized} == {torch.float32}  # peft's upcast
    cast = training.embeddings_in_compute_dtype(model)
    assert cast == 2 * model.config.vocab_size * model.config.hidden_size  # embedding and head (not tied)
    assert model.get_input_embeddings().weight.dtype == model.get_output_embeddings().weight.dtype == torch.float16
    held = sum(p.numel() * p.element_size() for p in unquantized)
    result = plan.plan(presets.get_preset("tiny"), compute_bytes=2)
    assert result["parts_gb"]["unquantized parts"] == pytest.approx(held / plan.GB)


def test_the_head_in_fp16_runs_outside_autocast_too(tiny_dir, monkeypatch):
    """The final norm stays fp32; a forward without autocast (generation after training) must still work."""
    import torch
    from peft import prepare_model_for_kbit_training

    from lora_helpers import device, models, training

    monkeypatch.setattr(device, "compute_dtype", lambda: torch.bfloat16)  # a half type a CPU can multiply
    model = prepare_model_for_kbit_training(models.load_model("tiny", load_in_4bit=True), False)
    training.embeddings_in_compute_dtype(model)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 14]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_llama2_7b_weight_memory():
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig())
    sizes = plan.weight_memory_gb(model)
    assert sizes["16-bit"] == pytest.approx(6_738_415_616 * 2 / 2**30)
    assert 3.4 < sizes["4-bit NF4"] < 3.8  # what the QLoRA paper's 7B row reports, about 3.6 GB
    assert sizes["4-bit NF4"] < sizes["8-bit"] < sizes["16-bit"]


def test_weight_bars_compare_like_with_like_on_a_cpu(tiny_model_4bit):
    """fp32 for what is never quantized, in every bar: 8-bit stays below 16-bit even for tiny's large embeddings."""
    sizes = plan.weight_memory_gb(tiny_model_4bit, unquantized_bytes=4)
    assert sizes["4-bit NF4"] < sizes["8-bit"] < sizes["16-bit"]
    measured = tiny_model_4bit.get_memory_footprint()
    assert sizes["4-bit NF4"] * 2**30 == pytest.approx(measured, rel=0.15)


def test_a_cpu_plan_has_no_gpu_overhead():
    on_gpu = plan.plan_for_preset("tiny")
    on_cpu = plan.plan(presets.resolve_settings("tiny"), compute_bytes=4, gpu=False)
    assert "overhead" in on_gpu["parts_gb"] and "overhead" not in on_cpu["parts_gb"]
    assert on_cpu["peak_gb"] < 0.1  # tiny: megabytes, not the CUDA context's half gigabyte


# Measured on an H200 under the T4 rehearsal (README, "What a T4 needs"): Llama-2-7B's shapes, llama2-7b-about-me,
# each notebook's peak reserved GPU memory (GB). The planner must stay within 15% of them.
MEASURED_LLAMA2_7B_GPU_GB = {"02": 3.91, "05": 12.79, "06": 12.63}


def test_notebook_estimates_are_close_to_what_a_gpu_measured():
    estimate = plan.notebook_memory(presets.get_preset("llama2-7b-about-me"))
    for notebook, measured in MEASURED_LLAMA2_7B_GPU_GB.items():
        assert estimate[notebook]["gpu_gb"] == pytest.approx(measured, rel=0.15), notebook


def test_every_notebook_has_an_estimate_and_the_big_ones_hold_the_16bit_model():
    settings = presets.get_preset("llama3.1-8b")
    estimate = plan.notebook_memory(settings)
    assert list(estimate) == ["01", "02", "03", "04", "05", "06"]
    sixteen_bit = plan.lora.base_parameter_count(plan.meta_model(plan.load_config(settings.model_id))) * 2 / plan.GB
    assert estimate["01"]["gpu_gb"] == 0
    assert estimate["02"]["gpu_gb"] < sixteen_bit / 2 < sixteen_bit < estimate["05"]["gpu_gb"]
    assert estimate["06"]["gpu_gb"] >= estimate["04"]["gpu_gb"]
    assert estimate["05"]["host_gb"] == estimate["02"]["host_gb"] + plan.SHARD_GB
    cpu = plan.notebook_memory(settings, compute_bytes=4, gpu=False)
    assert all(nb["gpu_gb"] == 0 for nb in cpu.values()) and cpu["05"]["host_gb"] > 2 * sixteen_bit


def test_notebook_check_says_what_fits_a_t4_and_what_to_change():
    eight_b = presets.get_preset("llama3.1-8b")
    text = plan.check_notebook(eight_b, "05")
    assert "on a Colab T4" in text and "placed in RAM by device_map='auto'" in text  # 16 GB: 1.3 GB spill
    assert "fits" in plan.check_notebook(presets.get_preset("tiny"), "04").splitlines()[1]
    need = {"gpu_gb": 20.0, "host_gb": 3.0}
    assert plan.verdict(need, "04", 14.3, 12.7).startswith("probably does NOT fit: see the training plan")
    assert plan.verdict(need, "02", 14.3, 12.7).startswith("probably does NOT fit: a smaller model")
    assert plan.verdict({"gpu_gb": 20.0, "host_gb": 8.0}, "05", 14.3, 12.7).startswith("probably does NOT fit in RAM")


def test_per_gpu_plans_for_data_parallel_and_sharded_training():
    settings = presets.get_preset("llama2-7b-guanaco")
    one = plan.plan(settings)
    ddp = plan.plan(settings, num_gpus=2, strategy="ddp")
    fsdp = plan.plan(settings, num_gpus=2, strategy="fsdp")
    assert one["strategy"] == "single" and ddp["strategy"] == "ddp" and fsdp["strategy"] == "fsdp"
    assert ddp["effective_batch"] == 2 * one["effective_batch"] == 2 * 2 * 4
    # DDP: a whole model per GPU, plus a copy of the trainable gradients in its buckets
    assert ddp["parts_gb"]["quantized weights"] == one["parts_gb"]["quantized weights"]
    assert ddp["parts_gb"]["DDP gradient buckets"] == pytest.approx(one["trainable"] * 4 / plan.GB)
    assert ddp["peak_gb"] > one["peak_gb"]
    # FSDP: weights, adapter gradients and optimizer states split; one layer (and the next) gathered whole
    for part in ("quantized weights", "unquantized parts", "LoRA weights+grads+Adam"):
        assert fsdp["parts_gb"][part] == pytest.approx(one["parts_gb"][part] / 2)
    assert fsdp["parts_gb"]["activations"] == one["parts_gb"]["activations"]  # each GPU its own batch
    assert fsdp["peak_gb"] < one["peak_gb"]
    with pytest.raises(ValueError, match="strategy='zero3'"):
        plan.plan(settings, num_gpus=2, strategy="zero3")


def test_will_a_13b_fit_two_t4s_and_a_70b_two_24gb_gpus(capsys):
    assert (
        cli.main(
            [
                "plan",
                "--preset",
                "llama2-7b-guanaco",
                "-p",
                "model_id=NousResearch/Llama-2-13b-chat-hf",
                "-p",
                "num_gpus=2",
                "-p",
                "strategy=fsdp",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "per GPU of 2 (FSDP, effective batch 16)" in text and "15 GB yes" in text
    seventy = "meta-llama/Llama-3.1-70B-Instruct"
    two = plan.plan_for_preset("llama2-7b-guanaco", num_gpus=2, strategy="fsdp", model_id=seventy)
    four = plan.plan_for_preset("llama2-7b-guanaco", num_gpus=4, strategy="fsdp", model_id=seventy)
    assert not two["fits_gb"][24] and four["fits_gb"][24]  # 2 x 24 GB: offload or shorter examples; 4 x 24 GB fits
    assert plan.plan_for_preset("llama2-7b-guanaco", num_gpus=2, strategy="ddp", model_id=seventy)["peak_gb"] > 40
