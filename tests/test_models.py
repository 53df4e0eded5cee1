import pytest
import torch

from lora_helpers import models


def test_tiny_loads_in_4bit(tiny_model_4bit):
    q_proj = tiny_model_4bit.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert tiny_model_4bit.is_loaded_in_4bit


def test_tiny_loads_unquantized_in_fp32(tiny_dir):
    import torch

    model = models.load_model("tiny", load_in_4bit=False)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("model_id, pad", [("tiny-llama2", "<unk>"), ("tiny-llama3", "<|finetune_right_pad_id|>")])
def test_loaded_tokenizers_pad_with_a_token_that_is_not_eos(model_id, pad, fresh_cache):
    """The twins ship no pad token, as real Llama-2 and Llama-3 do: the course's loader must choose one."""
    tokenizer = models.load_tokenizer(model_id)
    assert tokenizer.pad_token == pad and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_unreachable_hub_id_says_how_to_work_offline():
    with pytest.raises(OSError, match=r"'NousResearch/Llama-2-7b-chat-hf'.*HF_HUB_OFFLINE=1.*local model folder"):
        models.load_tokenizer("NousResearch/Llama-2-7b-chat-hf")


def hub_error(kind, status: int):
    """One of huggingface_hub's HTTP errors, with the response it needs."""
    from huggingface_hub import errors

    client = __import__(errors.Response.__module__.split(".")[0])  # the HTTP client huggingface_hub uses
    request = client.Request("GET", "https://huggingface.co/api/models/someone/model")
    return kind(f"{status} Client Error", response=client.Response(status, request=request))


def wrapped(hub_error):
    """A Hub error as transformers raises it: an OSError raised from it."""
    try:
        try:
            raise hub_error
        except Exception as cause:
            raise OSError("transformers' own words") from cause
    except OSError as error:
        return error


def test_gated_model_error_says_where_the_token_goes():
    from huggingface_hub.errors import GatedRepoError

    error = models.explain_load_error("meta-llama/Llama-3.1-8B", wrapped(hub_error(GatedRepoError, 401)))
    assert isinstance(error, PermissionError) and "HF_TOKEN" in str(error)
    assert models.explain_load_error("meta-llama/Llama-3.1-8B", OSError("a 401 in the text")) is not error


def test_a_missing_repository_is_named():
    from huggingface_hub.errors import RepositoryNotFoundError

    error = models.explain_load_error("someone/typo", wrapped(hub_error(RepositoryNotFoundError, 404)))
    assert "No model 'someone/typo' on the Hugging Face Hub" in str(error)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "nowhere", r"No model folder at .*nowhere"),
        (lambda d: d, r"has no config.json, so it is not a model folder"),
        (lambda d: (d / "config.json").write_text("{not json") and d, r"config.json is not valid JSON .*line 1"),
    ],
)
def test_local_folder_problems_are_named_by_their_cause(tmp_path, make, expected):
    with pytest.raises((OSError, ValueError), match=expected):
        models.load_model(str(make(tmp_path)), load_in_4bit=False)


def test_other_errors_keep_their_own_type_and_message(monkeypatch, tiny_dir):
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("something the course does not know about")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="something the course does not know about"):
        models.load_model("tiny", load_in_4bit=False)


def test_each_process_loads_onto_its_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert models.process_device_map() == {"": 1}  # torchrun's second process on a machine: GPU 1, not GPU 0
    monkeypatch.delenv("LOCAL_RANK")
    assert models.process_device_map() == {"": 0}


def test_under_an_fsdp_launch_4bit_weights_are_stored_in_one_float_dtype(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = models.load_model("tiny", load_in_4bit=True)
    assert model.config.quantization_config.bnb_4bit_quant_storage == torch.float32
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}  # FSDP gathers one dtype
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert torch.uint8 in {parameter.dtype for parameter in models.load_model("tiny", load_in_4bit=True).parameters()}
