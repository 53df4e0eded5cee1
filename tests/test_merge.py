import pytest
from peft import LoraConfig, get_peft_model

from lora_helpers import evaluate, merge, models, presets


def test_merging_into_4bit_weights_is_refused_with_the_alternatives(tiny_model_4bit):
    model = get_peft_model(tiny_model_4bit, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(
        ValueError, match=r"still stores 14 linear layers in 4 bits.*merge_mode='unquantized'.*'dequantized'"
    ):
        merge.refuse_4bit_merge(model)


def test_dequantized_base_holds_the_nf4_values(tiny_dir):
    import torch

    settings = presets.resolve_settings("tiny")
    tokenizer = models.load_tokenizer("tiny")
    dequantized = merge.load_base_for_merge(settings, "dequantized", torch.float32, tokenizer)
    merge.refuse_4bit_merge(dequantized)  # plain linear layers now: merging is allowed
    original = models.load_model("tiny", load_in_4bit=False)
    w_nf4 = dequantized.model.layers[0].self_attn.q_proj.weight
    w = original.model.layers[0].self_attn.q_proj.weight
    assert 0 < (w_nf4 - w).abs().max() < 0.25 * w.abs().max()  # rounded to NF4 levels, not the original
    prompts = [tokenizer("Hello")["input_ids"]]
    assert (
        evaluate.max_difference(evaluate.prompt_logits(dequantized, prompts), evaluate.prompt_logits(original, prompts))
        > 0
    )


@pytest.mark.parametrize("merge_mode", ["unquantized", "dequantized"])
def test_notebook_05_builds_the_base_as_load_base_for_merge_does(merge_mode, tiny_dir):
    """Notebook 05 writes both merges' loads out (its `dequantize()` included); merge.load_base_for_merge (its
    compare_modes cell) must build the same model."""
    import nbformat
    import torch

    cells = {c.id: c.source for c in nbformat.read("notebooks/05_merge.ipynb", as_version=4).cells}
    settings = presets.resolve_settings("tiny")
    tokenizer = models.load_tokenizer("tiny")
    namespace = {"merge_mode": merge_mode, "settings": settings, "merge_dtype": torch.float32, "tokenizer": tokenizer}
    exec(compile("import torch\nfrom lora_helpers import lora, merge, models\n" + cells["05-12"], "05-12", "exec"), namespace)
    helper = merge.load_base_for_merge(settings, merge_mode, torch.float32, tokenizer).state_dict()
    taught = namespace["base"].state_dict()
    assert taught.keys() == helper.keys()
    assert all(torch.equal(taught[name], helper[name]) for name in taught)


def test_unknown_merge_mode():
    with pytest.raises(ValueError, match="unquantized"):
        merge.load_base_for_merge(presets.resolve_settings("tiny"), "4bit", None, None)
