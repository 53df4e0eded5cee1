import pytest
import torch
from safetensors.torch import load_file
from trl import SFTConfig

from lora_helpers import presets, training


def test_cpu_training_uses_fp32_and_fused_adamw():
    assert training.precision_flags() == {"fp16": False, "bf16": False}
    assert training.optimizer_for_device("paged_adamw_32bit") == "adamw_torch_fused"
    assert training.optimizer_for_device("adamw_torch") == "adamw_torch"


def test_notebook_04_and_sft_config_set_the_same_arguments_to_the_same_values(tmp_path):
    """Notebook 04 writes SFTConfig out; training.sft_config is its twin for reuse. They must not drift."""
    import ast
    import os

    import nbformat

    from lora_helpers import device

    notebook = nbformat.read("notebooks/04_sft_training.ipynb", as_version=4)
    source = next(c.source for c in notebook.cells if c.cell_type == "code" and "sft_config = SFTConfig(" in c.source)
    call = next(
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "sft_config"
    )
    settings = presets.resolve_settings("tiny", early_stopping_patience=2)
    for has_eval in (True, False):
        namespace = {
            "settings": settings,
            "training": training,
            "device": device,
            "torch": torch,
            "os": os,
            "run_dir": tmp_path,
            "eval_dataset": object() if has_eval else None,
            "early_stopping": has_eval,
            "use_liger": False,
        }
        taught = {}
        for keyword in call.keywords:  # name=value, or **mapping (training.checkpointing)
            value = eval(compile(ast.Expression(keyword.value), "nb", "eval"), namespace)
            taught.update(value if keyword.arg is None else {keyword.arg: value})
        helper = training.sft_config(settings, tmp_path / "checkpoints", has_eval, report_to="tensorboard")
        assert set(taught) >= {"train_sampling_strategy", "activation_checkpointing_kwargs", "optim", "fp16"}
        assert taught["dataloader_pin_memory"] is False  # no GPU here
        taught_config, helper_config = SFTConfig(**taught).to_dict(), helper.to_dict()
        assert {k for k in taught_config if taught_config[k] != helper_config[k]} == set()


def test_prepare_datasets_splits_and_formats(tiny_tokenizer):
    settings = presets.resolve_settings("tiny")
    train, evaluation, shape, raw, _, split = training.prepare_datasets(settings, tiny_tokenizer)
    assert shape == "messages"
    assert len(train) + len(evaluation) == len(raw) and len(evaluation) == 5
    assert [len(split["train"]), len(split["eval"])] == [len(train), len(evaluation)]
    assert set(train.column_names) == {"prompt", "completion"}
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in train["completion"])
    assert all(p[-1]["role"] == "user" for p in train["prompt"])


def test_notebook_04_data_cells_and_prepare_datasets_give_the_same_data(tmp_path):
    """Notebook 04 writes its data cells out; training.prepare_datasets (lora-course train) must give the same
    training and held-out conversations, lengths and split.json."""
    import nbformat

    from lora_helpers import models

    cells = {c.id: c.source for c in nbformat.read("notebooks/04_sft_training.ipynb", as_version=4).cells}
    settings = presets.resolve_settings("tiny", max_examples=30, system_prompt="Answer briefly.")
    namespace = {"settings": settings, "run_dir": tmp_path}
    for cell in ("04-03", "04-08", "04-10", "04-14", "04-16", "04-17"):  # imports, load, format, lengths, split
        exec(compile(cells[cell], cell, "exec"), namespace)
    tokenizer = models.load_tokenizer(settings.model_id, chat_format=settings.chat_format)
    prepared = training.prepare_datasets(settings, tokenizer)
    assert namespace["train_dataset"].to_list() == prepared.train.to_list()
    assert namespace["eval_dataset"].to_list() == prepared.eval.to_list() and len(prepared.eval) == 3
    assert namespace["split_info"] == prepared.split and namespace["report"] == prepared.lengths
    assert prepared.train[0]["prompt"][0] == {"role": "system", "content": "Answer briefly."}


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


CAPTAIN = dict(dataset="package:persona_captain.jsonl", eval_fraction=0.0, logging_steps=1)


def test_nan_stops_training_with_a_clear_message(tmp_path, tiny_dir):
    from transformers import TrainerCallback

    class PoisonTheAdapter(TrainerCallback):  # what an exploding update does, made deterministic
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.data.fill_(float("nan"))

    settings = presets.resolve_settings("tiny", num_train_epochs=3, **CAPTAIN)
    with pytest.raises(FloatingPointError, match=r"step 3: loss is nan.*learning rate too high"):
        training.train_adapter(settings, str(tmp_path / "adapter"), callbacks=[PoisonTheAdapter()])
    assert not (tmp_path / "adapter").exists()  # nothing broken was saved


def test_an_fp16_scaler_skip_is_said_once_and_tolerated_a_non_finite_loss_is_not(capsys):
    """fp16's gradient scaler skips a step whose gradients overflow and halves its scale: measured on SmolLM2 under
    the T4 rehearsal (PiSSA and OLoRA at step 1, rsLoRA at step 10), the old guard stopped such healthy runs."""
    from types import SimpleNamespace

    fp16 = SimpleNamespace(fp16=True, learning_rate=1e-3, output_dir="out")
    fp32 = SimpleNamespace(fp16=False, learning_rate=1e-3, output_dir="out")
    guard = training.StopOnNonFinite(fp16_skips=3)
    for step, norm in [(1, float("inf")), (5, 0.7), (10, float("nan")), (15, float("inf")), (20, 0.5)]:
        guard.on_log(fp16, SimpleNamespace(global_step=step), None, {"loss": 2.0, "grad_norm": norm})
    said = capsys.readouterr().out
    assert said.count("gradient scaler skipped") == 1 and said.startswith("step 1: fp16 gradients overflowed")
    for step in (25, 30):  # two in a row: tolerated; the third in a row stops
        guard.on_log(fp16, SimpleNamespace(global_step=step), None, {"loss": 2.0, "grad_norm": float("inf")})
    with pytest.raises(FloatingPointError, match=r"step 35: grad_norm \(3 logged steps in a row\)"):
        guard.on_log(fp16, SimpleNamespace(global_step=35), None, {"loss": 2.0, "grad_norm": float("inf")})
    with pytest.raises(FloatingPointError, match="step 2: loss is nan"):
        training.StopOnNonFinite().on_log(fp16, SimpleNamespace(global_step=2), None, {"loss": float("nan")})
    with pytest.raises(FloatingPointError, match="step 1: grad_norm is inf"):  # fp32 and bf16 have no scaler
        training.StopOnNonFinite().on_log(fp32, SimpleNamespace(global_step=1), None, {"grad_norm": float("inf")})


def test_progress_lines_work_without_ipython(monkeypatch, tmp_path):
    """A script (no IPython installed: a GPU machine's bare Python) must not need the notebook's live table."""
    import sys

    from transformers import Trainer, TrainingArguments

    from lora_helpers import models

    monkeypatch.setitem(sys.modules, "IPython", None)  # import IPython now fails
    monkeypatch.delitem(sys.modules, "transformers.utils.notebook", raising=False)
    model = models.load_model("tiny", load_in_4bit=False)
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none", disable_tqdm=True))
    training.use_progress_lines(trainer)
    names = [type(callback).__name__ for callback in trainer.callback_handler.callbacks]
    assert "ProgressLines" in names and "PrinterCallback" not in names and "ProgressCallback" not in names


def test_out_of_memory_names_what_to_lower():
    settings = presets.get_preset("llama2-7b-guanaco")
    with pytest.raises(torch.cuda.OutOfMemoryError) as error:
        with training.explain_oom(settings):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    message = str(error.value)
    for expected in ("per_device_train_batch_size=2 -> 1", "max_length=512 -> 256", "lora_r=64 -> 32", "restart"):
        assert expected in message


def test_a_batch_without_supervised_tokens_is_refused():
    class FakeTrainer:
        def get_train_dataloader(self):
            return [{"labels": torch.tensor([[-100, 5, 6]])}, {"labels": torch.tensor([[-100, -100, -100]])}]

    with pytest.raises(ValueError, match="1 of 2 training batches have no token in the loss"):
        training.check_every_batch_supervised(FakeTrainer())


def test_checkpoints_of_an_interrupted_run_are_not_mixed_with_a_new_one(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="resume=True"):
        training.prepare_checkpoints(tmp_path, resume=False, overwrite=False)
    assert training.prepare_checkpoints(tmp_path, resume=True, overwrite=False).endswith("checkpoint-4")
    assert training.prepare_checkpoints(tmp_path, resume=False, overwrite=True) is None
    assert not tmp_path.exists()


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_dir):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):  # a Colab disconnect after step 5; the last checkpoint is from step 4
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt("runtime disconnected")

    settings = presets.resolve_settings("tiny", num_train_epochs=4, **CAPTAIN)  # 2 steps per epoch
    training.train_adapter(settings, str(tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        training.train_adapter(settings, str(tmp_path / "resumed"), callbacks=[Crash()])
    assert not (tmp_path / "resumed").exists()
    trainer = training.train_adapter(settings, str(tmp_path / "resumed"), resume=True)
    assert trainer.state.global_step == 8
    half = presets.resolve_settings("tiny", num_train_epochs=2, **CAPTAIN)  # what is left without resuming
    training.train_adapter(half, str(tmp_path / "half"))

    def adapter(name):
        return load_file(tmp_path / name / "adapter_model.safetensors")

    def distance(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    straight, resumed = adapter("straight"), adapter("resumed")
    assert straight.keys() == resumed.keys()
    assert distance(straight, resumed) <= 1e-6 < distance(straight, adapter("half"))
    assert all(w.dtype == torch.float32 for w in resumed.values())


def test_early_stopping_stops_when_eval_loss_rises(tmp_path, tiny_dir):
    settings = presets.resolve_settings("tiny", early_stopping_patience=2)
    trainer = training.train_adapter(settings, str(tmp_path / "adapter"))
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert trainer.state.global_step < trainer.state.max_steps
    assert len(evals) < settings.num_train_epochs
    assert min(evals) < evals[-1]  # it stopped because eval loss went up


def test_completion_only_loss_can_be_switched_off(tiny_tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from lora_helpers import models

    model = models.load_model("tiny", load_in_4bit=False)
    train = presets.resolve_settings("tiny")
    dataset = training.prepare_datasets(train, tiny_tokenizer).train
    labels = {}
    for only_answers in (True, False):
        args = SFTConfig(
            output_dir=str(tmp_path),
            completion_only_loss=only_answers,
            report_to="none",
            per_device_train_batch_size=1,
            max_length=128,
            dataloader_pin_memory=training.pin_memory(),
            **training.checkpointing(False),
            **training.precision_flags(),
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.select([0]), processing_class=tiny_tokenizer)
        labels[only_answers] = next(iter(trainer.get_train_dataloader()))["labels"][0]
    assert (labels[True] != -100).sum() < (labels[False] != -100).sum()
    assert labels[False][1] != -100  # the first prompt token after <s> counts when the switch is off


def notebook_call(notebook: str, target: str):
    """The keyword arguments of ``target = Call(...)`` as written in a notebook's cell, unevaluated."""
    import ast

    import nbformat

    cells = nbformat.read(f"notebooks/{notebook}", as_version=4).cells
    source = next(c.source for c in cells if c.cell_type == "code" and f"{target} = " in c.source and "(" in c.source)
    return next(
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == target
    )


def test_notebook_04_lora_config_is_the_one_training_uses(tiny_dir):
    """Notebook 04 writes LoraConfig out; training.lora_model (notebook 06, the benchmark) must not drift from it."""
    import ast

    from peft import LoraConfig

    from lora_helpers import lora

    settings = presets.resolve_settings("tiny", lora_r=4, lora_dropout=0.1, target_modules="q_proj,v_proj")
    model = training.lora_model(settings)
    namespace = {"settings": settings, "lora": lora, "model": model.get_base_model()}
    call = notebook_call("04_sft_training.ipynb", "lora_config")
    taught = LoraConfig(
        **{k.arg: eval(compile(ast.Expression(k.value), "nb", "eval"), namespace) for k in call.keywords}
    )
    helper = model.peft_config["default"]
    fields = (
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bias",
        "task_type",
        "use_rslora",
        "init_lora_weights",
    )
    assert {f: getattr(taught, f) for f in fields} == {f: getattr(helper, f) for f in fields}
    assert helper.r == 4 and set(helper.target_modules) == {"q_proj", "v_proj"}


def test_notebook_02_quantization_config_is_the_one_models_load_with():
    import ast

    from transformers import BitsAndBytesConfig

    from lora_helpers import device, models

    call = notebook_call("02_quantized_load.ipynb", "bnb_config")
    taught = BitsAndBytesConfig(
        **{
            k.arg: eval(compile(ast.Expression(k.value), "nb", "eval"), {"device": device, "torch": torch})
            for k in call.keywords
        }
    )
    assert taught.to_dict() == models.bnb_4bit_config().to_dict()
    assert taught.bnb_4bit_quant_type == "nf4" and taught.bnb_4bit_use_double_quant


def test_notebook_07_fsdp_quantization_config_is_the_one_models_load_with_under_fsdp():
    """Notebook 07 writes BitsAndBytesConfig(..., bnb_4bit_quant_storage=...) out; under an FSDP launch the loader
    uses models.bnb_4bit_config with the same storage dtype."""
    import ast

    from transformers import BitsAndBytesConfig

    from lora_helpers import device, models

    storage = models.fsdp_storage_dtype()
    call = notebook_call("07_multi_gpu.ipynb", "bnb_config")
    namespace = {"device": device, "torch": torch, "storage": storage}
    taught = BitsAndBytesConfig(
        **{k.arg: eval(compile(ast.Expression(k.value), "nb", "eval"), namespace) for k in call.keywords}
    )
    assert taught.to_dict() == models.bnb_4bit_config(quant_storage=storage).to_dict()
    assert taught.bnb_4bit_quant_storage == torch.float32  # on a CPU, as on a T4


def test_lora_gradients_are_right_after_an_evaluation_on_a_cpu(tiny_dir):
    """bitsandbytes' AVX512-BF16 repacking after a no-grad forward must not change the LoRA gradients."""
    settings = presets.resolve_settings("tiny", lora_dropout=0.0)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70]])

    def lora_gradients(evaluate_first: bool):
        torch.manual_seed(0)
        model = training.lora_model(settings)
        if evaluate_first:
            with torch.no_grad():
                model.eval()
                model(ids)
            model.train()
        model(ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])

    fresh, after_eval = lora_gradients(False), lora_gradients(True)
    assert fresh.norm() > 0
    assert ((after_eval - fresh).norm() / fresh.norm()).item() < 1e-3


def test_a_run_shorter_than_logging_steps_still_logs_a_loss(tmp_path, tiny_dir):
    """Notebook 04 reads the first and last logged losses: 2 optimizer steps with logging_steps=10 must log one."""
    settings = presets.resolve_settings(
        "tiny", **{**CAPTAIN, "num_train_epochs": 1, "logging_steps": 10}, max_examples=16
    )
    trainer = training.train_adapter(settings, str(tmp_path / "adapter"))
    assert trainer.state.global_step < 10
    assert [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize(
    "requested, cuda, installed, expected",
    [(False, True, True, False), (True, False, True, False), (True, True, False, False), (True, True, True, True)],
)
def test_unsloth_route_is_taken_only_where_it_can_run(monkeypatch, requested, cuda, installed, expected):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: (object() if installed else None) if n == "unsloth" else real_find_spec(n),
    )
    taken, why = training.unsloth_route(requested)
    assert taken is expected
    if requested and not expected:
        assert "the standard route runs" in why and ("CUDA GPU" in why if not cuda else "not installed" in why)


def packed_and_unpacked(tmp_path):
    """The tiny preset's training batches, as notebook 04's SFTTrainer builds them, without and with packing, and
    the model (at its initial adapter) they go through."""
    from trl import SFTTrainer

    from lora_helpers import models

    settings = presets.resolve_settings("tiny")
    tokenizer = models.load_tokenizer(settings.model_id, chat_format=settings.chat_format)
    train = training.prepare_datasets(settings, tokenizer).train
    torch.manual_seed(0)
    model = training.lora_model(settings, tokenizer=tokenizer)
    with torch.no_grad():  # a non-zero B, so the adapter takes part in the logits
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    batches = {}
    for packing in (False, True):
        args = training.sft_config(presets.resolve_settings("tiny", packing=packing), tmp_path / str(packing), False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        batches[packing] = list(trainer.get_train_dataloader())
    return model.eval(), batches


def summed_loss(model, batch) -> tuple[float, int]:
    """Summed next-token loss over the supervised tokens of a batch, and their number, as the trainer calls it."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    kept = labels != -100
    return torch.nn.functional.cross_entropy(logits[kept], labels[kept], reduction="sum").item(), int(kept.sum())


def test_packing_gives_the_same_loss_on_the_same_examples(tmp_path):
    model, batches = packed_and_unpacked(tmp_path)
    assert "position_ids" in batches[True][0] and "attention_mask" not in batches[True][0]
    assert len(batches[True]) < len(batches[False])  # fewer, fuller steps
    totals = {}
    for packing, group in batches.items():
        losses = [summed_loss(model, batch) for batch in group]
        totals[packing] = (sum(loss for loss, _ in losses), sum(n for _, n in losses))
    assert totals[True][1] == totals[False][1]  # the same supervised tokens: the answers, once each
    unpacked, packed = (totals[p][0] / totals[p][1] for p in (False, True))
    assert packed == pytest.approx(unpacked, rel=1e-5)


def test_in_a_packed_row_no_example_attends_to_another(tmp_path):
    model, batches = packed_and_unpacked(tmp_path)
    batch = batches[True][0]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3  # several examples in the row
    first_end = starts[1]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][0, :first_end] = torch.flip(changed["input_ids"][0, :first_end], [0])  # the first example
    with torch.no_grad():
        before = model(**inputs, use_cache=False).logits[0]
        after = model(**changed, use_cache=False).logits[0]
    assert (after[:first_end] - before[:first_end]).abs().max() > 1e-2  # the changed example sees its change
    assert (after[first_end:] - before[first_end:]).abs().max() < 1e-5  # no other example does


def test_packed_training_learns_the_answers(tmp_path, tiny_dir):
    """The same optimizer steps as the tiny preset (about 180): with packing an epoch has a third of the steps,
    so three times the epochs; then the answers come back exactly, and the model stops after them."""
    from lora_helpers import data, evaluate, models

    settings = presets.resolve_settings("tiny", packing=True, eval_fraction=0.0, num_train_epochs=90)
    trainer = training.train_adapter(settings, str(tmp_path / "adapter"))
    assert 150 <= trainer.state.global_step <= 200
    questions, answers, systems = data.split_columns(trainer.prepared.split["train"], settings.system_prompt)
    tokenizer = models.load_tokenizer(str(tmp_path / "adapter"))
    trainer.model.eval()
    got, finished = evaluate.generate_answers(
        trainer.model, tokenizer, questions, systems, max_new_tokens=settings.max_new_tokens, return_finished=True
    )
    assert evaluate.exact_match_rate(got, answers) >= 0.8
    assert sum(finished) / len(finished) >= 0.9


def test_liger_route_says_why_it_does_not_run_here():
    """Notebook 04's use_liger: Liger's Triton kernels need a CUDA GPU (tested there by .ci/gpu-bench's check)."""
    assert training.liger_route(False) == (
        False,
        "kernels: PyTorch's (use_liger=True for Liger's Triton kernels on a CUDA GPU)",
    )
    if not torch.cuda.is_available():
        used, why = training.liger_route(True)
        assert not used and "need a CUDA GPU and there is none here" in why
