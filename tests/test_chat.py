"""One tokenization for training and inference, per model family (the tiny twins of Llama-2 and Llama-3)."""

import copy
import dataclasses

import pytest
import torch

from lora_helpers import chat, data, models, presets, training

FAMILIES = ["tiny", "tiny-llama2", "tiny-llama3"]
QA = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Ada Quill."}]}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, fresh_cache):
    settings = presets.resolve_settings(request.param)
    return settings, models.load_tokenizer(settings.model_id, chat_format=settings.chat_format)


def test_training_ids_are_the_ids_of_the_template_at_inference(family):
    """What SFTTrainer trains on = apply_chat_template(prompt, add_generation_prompt=True) + the answer's ids."""
    from trl import SFTTrainer

    settings, tokenizer = family
    train = training.prepare_datasets(dataclasses.replace(settings, eval_fraction=0.0), tokenizer).train
    model = training.lora_model(settings, tokenizer=tokenizer)
    trainer = SFTTrainer(
        model=model,
        args=training.sft_config(settings, "unused", False),
        train_dataset=train,
        processing_class=tokenizer,
    )
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    for index in range(5):
        example = train[index]
        inference = chat.prompt_ids(tokenizer, example["prompt"])  # how the model is prompted later
        answer = chat.template_ids(tokenizer, example["prompt"] + example["completion"])[len(inference) :]
        trained = trainer.train_dataset[index]
        assert trained["input_ids"] == inference + answer
        supervised = [i for i, label in zip(trained["input_ids"], trained["labels"]) if label != -100]
        assert supervised == answer and answer[-1] in eos_ids and answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == example["completion"][0]["content"]


def test_the_sentencepiece_trap_is_real_and_avoided(fresh_cache):
    """Llama-2's tokenizer splits "[INST]" differently after <s> than at the start of a text."""
    tokenizer = models.load_tokenizer("tiny-llama2", chat_format="auto")
    messages = QA["messages"][:1]
    template = chat.prompt_ids(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without_bos = tokenizer(text.removeprefix(tokenizer.bos_token))["input_ids"]  # BOS added by the tokenizer
    assert tokenizer.convert_ids_to_tokens(template[1]) == "["
    assert tokenizer.convert_ids_to_tokens(without_bos[1]) == "\u2581["
    assert without_bos != template
    assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # text re-tokenized: BOS twice
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == template


def test_llama3_template_has_headers_date_lines_and_eot(fresh_cache):
    tokenizer = models.load_tokenizer("tiny-llama3", chat_format="auto")
    text = tokenizer.apply_chat_template(QA["messages"], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date:")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nAda Quill.<|eot_id|>")
    ids = chat.template_ids(tokenizer, QA["messages"])
    assert ids.count(tokenizer.convert_tokens_to_ids("<|start_header_id|>")) == 3  # special tokens stay whole


def test_the_llama2_template_writes_the_llama2_format(fresh_cache):
    tokenizer = models.load_tokenizer("tiny-llama2", chat_format="auto")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST] Ciao </s>"


@pytest.mark.parametrize(
    "model_id, pad", [("tiny", "<pad>"), ("tiny-llama2", "<unk>"), ("tiny-llama3", "<|finetune_right_pad_id|>")]
)
def test_pad_token_per_family_is_never_eos(model_id, pad, fresh_cache):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model_path(model_id))
    if model_id != "tiny":
        assert tokenizer.pad_token is None  # as every real Llama checkpoint ships
    tokenizer.pad_token = tokenizer.eos_token  # what the tutorials write
    assert chat.choose_pad_token(tokenizer) == pad
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and len(tokenizer) == 1024  # nothing added


def test_a_new_pad_token_only_when_none_exists_and_the_model_grows_to_fit(fresh_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = models.resolve_model_path("tiny-llama3")  # no <pad>, no <unk>, and tied embeddings
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.unk_token is None and "<pad>" not in tokenizer.get_vocab()
    with pytest.MonkeyPatch.context() as patch:  # as if Llama-3 had not reserved <|finetune_right_pad_id|>
        patch.setattr(chat, "PAD_CANDIDATES", ())
        assert chat.choose_pad_token(tokenizer) == "<pad>"
    assert tokenizer.pad_token_id == len(tokenizer) - 1 == 1024
    model = AutoModelForCausalLM.from_pretrained(directory)
    before = model.get_input_embeddings().weight.detach().clone()
    assert models.match_vocabulary(model, tokenizer) == 1
    assert models.match_vocabulary(model, tokenizer) == 0  # the second time there is nothing to do
    grown = model.get_input_embeddings().weight.detach()
    assert grown.shape[0] == 1025 and torch.equal(grown[:1024], before)  # the old rows are untouched
    assert model.lm_head.weight.shape[0] == 1025 and model.lm_head.weight.data_ptr() == grown.data_ptr()  # still tied


def test_auto_chat_format_gives_a_base_model_the_llama2_template(tiny_tokenizer):
    base = copy.deepcopy(tiny_tokenizer)
    base.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat.use_chat_format(copy.deepcopy(base), "template")
    assert chat.use_chat_format(base, "auto") == "llama2"
    assert base.apply_chat_template(QA["messages"], tokenize=False) == "<s>[INST] Who are you? [/INST] Ada Quill. </s>"
    llama3 = models.load_tokenizer("tiny-llama3")
    assert chat.use_chat_format(llama3, "llama2") == "llama2" and "[INST]" in llama3.chat_template


def test_conversations_from_every_shape_render_through_the_template(family):
    _, tokenizer = family
    example = data.to_prompt_completion({"text": "<s>[INST] Who are you? [/INST] Ada Quill. </s>"}, "text")
    assert example == data.to_prompt_completion(QA, "messages")
    head, answer = chat.prompt_and_completion_ids(tokenizer, example["prompt"], example["completion"])
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "Ada Quill."
