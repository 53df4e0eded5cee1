import json

import pandas as pd
import pytest

from lora_helpers import data

QA = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Ada."}]}


@pytest.mark.parametrize(
    "columns, shape",
    [
        (["messages"], "messages"),
        (["conversations", "id"], "conversations"),
        (["prompt", "completion"], "prompt_completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["text"], "text"),
    ],
)
def test_detect_shape(columns, shape):
    assert data.detect_shape(columns) == shape


def test_unknown_shape_names_the_accepted_ones():
    with pytest.raises(ValueError) as error:
        data.detect_shape(["question", "answer"])
    for description in data.SHAPES.values():
        assert description in str(error.value)


@pytest.mark.parametrize(
    "example, shape",
    [
        (QA, "messages"),
        (
            {"conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "Ada."}]},
            "conversations",
        ),
        ({"prompt": "Who are you?", "completion": "Ada."}, "prompt_completion"),
        ({"instruction": "Who are you?", "input": "", "output": "Ada."}, "alpaca"),
    ],
)
def test_every_shape_converts_to_the_same_messages(example, shape):
    assert data.to_messages(example, shape) == QA["messages"]


def test_alpaca_input_is_appended_to_the_instruction():
    messages = data.to_messages({"instruction": "Translate.", "input": "bom dia", "output": "good morning"}, "alpaca")
    assert messages[0]["content"] == "Translate.\n\nbom dia"


def test_prompt_completion_split_for_llama2(tiny_tokenizer):
    pc = data.to_prompt_completion(QA, "messages", tiny_tokenizer, "llama2")
    assert pc == {"prompt": "[INST] Who are you? [/INST]", "completion": " Ada. </s>"}


def test_template_route_matches_llama2_route_on_a_llama2_template(tiny_tokenizer):
    by_template = data.to_prompt_completion(QA, "messages", tiny_tokenizer, "template", system_prompt="Be kind.")
    by_function = data.to_prompt_completion(QA, "messages", tiny_tokenizer, "llama2", system_prompt="Be kind.")
    assert by_template == by_function
    assert by_function["prompt"].startswith("[INST] <<SYS>>\nBe kind.\n<</SYS>>")


def test_text_shape_drops_the_duplicate_bos_and_splits_at_the_answer(tiny_tokenizer):
    pc = data.to_prompt_completion({"text": "<s>[INST] Hi [/INST] Hello </s>"}, "text", tiny_tokenizer, "llama2")
    assert pc == {"prompt": "[INST] Hi [/INST]", "completion": " Hello </s>"}
    ids = tiny_tokenizer(pc["prompt"] + pc["completion"])["input_ids"]
    assert ids.count(tiny_tokenizer.bos_token_id) == 1


def test_question_answer_pairs_for_messages_and_text():
    assert data.question_answer_pairs([QA], "messages") == [("Who are you?", "Ada.")]
    assert data.question_answer_pairs([{"text": "<s>[INST] Hi [/INST] Hello </s>"}], "text") == [("Hi", "Hello")]


def test_shipped_datasets():
    about_me = data.read_jsonl(data.packaged_data_path("about_me.jsonl"))
    assert len(about_me) >= 40
    assert len({row["messages"][0]["content"] for row in about_me}) == len(about_me)
    assert all(data.detect_shape(row) == "messages" for row in about_me)
    guanaco = data.read_jsonl(data.packaged_data_path("guanaco_llama2_sample.jsonl"))
    assert all(row["text"].startswith("<s>[INST] ") and row["text"].endswith(" </s>") for row in guanaco)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_examples_from_local_files(tmp_path, suffix):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    dataset = data.load_examples(str(path))
    assert len(dataset) == 3 and data.detect_shape(dataset.column_names) == "prompt_completion"


def test_load_examples_package_prefix():
    assert len(data.load_examples("package:about_me.jsonl")) >= 40


def test_missing_dataset_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="Check `dataset`"):
        data.load_examples(str(tmp_path / "nope.jsonl"))


def test_empty_dataset_is_refused(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(ValueError, match="empty"):
        data.load_examples(str(path))


def test_pad_token_is_never_eos(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # what the seeds do
    chosen = data.choose_pad_token(tokenizer)
    assert chosen != tokenizer.eos_token and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_base_model_without_template_gets_the_llama2_format(tiny_tokenizer):
    import copy

    base = copy.deepcopy(tiny_tokenizer)
    base.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        pc = data.to_prompt_completion(QA, "messages", base, "template")
    assert pc == data.to_prompt_completion(QA, "messages", tiny_tokenizer, "llama2")


def test_sharegpt_system_turn_becomes_the_llama2_system_block(tiny_tokenizer):
    example = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    pc = data.to_prompt_completion(example, "conversations", tiny_tokenizer, "llama2")
    assert pc["prompt"] == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"


def test_length_report_counts_truncated_and_dropped(tiny_tokenizer):
    rows = [
        {"prompt": "[INST] Hi [/INST]", "completion": " Hello </s>"},
        {"prompt": "[INST] " + "word " * 40 + "[/INST]", "completion": " Yes </s>"},
        {"prompt": "[INST] Tell me [/INST]", "completion": " " + "more " * 40 + "</s>"},
    ]
    report = data.length_report(rows, tiny_tokenizer, max_length=30)
    assert (report["examples"], report["truncated"], report["dropped"]) == (3, 1, 1)
    assert report["longest"] == max(report["lengths"]) > 30
