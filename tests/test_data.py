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


def test_prompt_completion_is_conversational_with_the_system_prompt_first():
    example = data.to_prompt_completion(QA, "messages", system_prompt="Be kind.")
    assert example == {
        "prompt": [{"role": "system", "content": "Be kind."}, QA["messages"][0]],
        "completion": [QA["messages"][1]],
    }


def test_llama2_text_is_parsed_back_into_messages():
    text = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST] Ciao </s>"
    assert data.parse_llama2_text(text) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    assert data.parse_llama2_text("### Human: Hi ### Assistant: Hello") is None
    with pytest.raises(ValueError, match="not in Llama-2's"):
        data.to_prompt_completion({"text": "### Human: Hi ### Assistant: Hello"}, "text")


def test_every_shipped_guanaco_row_parses():
    rows = data.read_jsonl(data.packaged_data_path("guanaco_llama2_sample.jsonl"))
    for row in rows:
        messages = data.parse_llama2_text(row["text"])
        assert messages and messages[-1]["role"] == "assistant" and messages[-1]["content"]


def test_question_answer_pairs_for_messages_and_text():
    assert data.question_answer_pairs([QA], "messages") == [("Who are you?", "Ada.")]
    assert data.question_answer_pairs([{"text": "<s>[INST] Hi [/INST] Hello </s>"}], "text") == [("Hi", "Hello")]


@pytest.mark.parametrize("model_id", ["tiny", "tiny-llama2", "tiny-llama3"])
def test_length_report_counts_truncated_and_dropped(model_id, fresh_cache):
    from lora_helpers import models

    tokenizer = models.load_tokenizer(model_id, chat_format="auto")
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": "word " * 150}, {"role": "assistant", "content": "Yes"}]},
        {"messages": [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "more " * 150}]},
    ]
    examples = [data.to_prompt_completion(row, "messages") for row in rows]
    report = data.length_report(examples, tokenizer, max_length=120)
    assert (report["examples"], report["truncated"], report["dropped"]) == (3, 1, 1)
    assert report["longest"] == max(report["lengths"]) > 120


TURNS = '[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Ada."}]'
GOOD = '{"messages": ' + TURNS + "}\n"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.jsonl", "\n\n", r"is empty: it needs at least one example"),
        ("malformed.jsonl", GOOD + "\n" + '{"messages": [}\n', r"malformed\.jsonl, line 3: not valid JSON"),
        ("list.jsonl", GOOD + "[1, 2]\n", r"line 2: a JSON list, not an object"),
        ("latin1.jsonl", GOOD.replace("Ada", "Ad\xe9").encode("latin-1"), r"line 1: not UTF-8 text"),
        ("utf16.jsonl", GOOD.encode("utf-16"), r"is UTF-16 text .* Save it as UTF-8"),
        ("blank.csv", "prompt,completion\nWho?,Ada.\nWhere?,\n", r"blank\.csv, row 2 \(line 3.*`completion` is empty"),
        (
            "mixed.jsonl",
            GOOD + '{"prompt": "Who?", "completion": "Ada."}\n',
            r"line 2: this example has the shape 'prompt_completion', the file's first has the shape 'messages'",
        ),
        (
            "roles.jsonl",
            GOOD + GOOD.replace('"user"', '"human"').replace('"assistant"', '"bot"'),
            r"line 2: turn 1 has the role 'human'; the accepted roles are system, user, assistant",
        ),
        ("answer.jsonl", GOOD.replace("Ada.", "  "), r"line 1: turn 2 \(assistant\) is empty"),
        (
            "order.jsonl",
            '{"messages": [{"role": "assistant", "content": "Hi."}, ' + TURNS[1:] + "}\n",
            r"line 1: the turns are assistant -> user -> assistant; the accepted order is an optional system turn",
        ),
        (
            "unfinished.jsonl",
            '{"messages": ' + TURNS.replace(', {"role": "assistant", "content": "Ada."}', "") + "}\n",
            r"the turns are user; the accepted order",
        ),
        (
            "text.jsonl",
            '{"text": "<s>[INST] Who? [/INST] Ada. </s>"}\n{"text": "just prose"}\n',
            r"line 2: the text is not in Llama-2's",
        ),
    ],
)
def test_a_bad_dataset_names_its_line_and_what_is_accepted(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(ValueError, match=expected):
        data.check_examples(data.load_examples(str(path)), str(path))


def test_a_good_dataset_passes_and_keeps_its_shape(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace("Ada.", "Ada Quill."))
    assert data.check_examples(data.load_examples(str(path)), str(path)) == "messages"
    for name in ("about_me.jsonl", "persona_captain.jsonl", "guanaco_llama2_sample.jsonl"):
        assert data.check_examples(data.load_examples(f"package:{name}"), f"package:{name}")


def test_negative_max_examples_is_refused_before_loading():
    from lora_helpers import presets

    with pytest.raises(ValueError, match=r"max_examples=-1: must be 0 or more"):
        presets.resolve_settings("tiny", max_examples=-1)


def test_a_conversation_s_own_system_turn_is_kept_for_asking():
    """Trained with its own system turn, a question must be asked with it again (split.json, notebooks 04-06)."""
    own = {"messages": [{"role": "system", "content": "You are Ada."}, *QA["messages"]]}
    entries = data.question_answer_pairs([QA, own], "messages")
    assert entries == [("Who are you?", "Ada."), ("Who are you?", "Ada.", "You are Ada.")]
    assert data.split_columns(entries, "Be brief.") == (
        ["Who are you?", "Who are you?"],
        ["Ada.", "Ada."],
        ["Be brief.", "You are Ada."],
    )
