"""Datasets: loading them, recognising their shape, and turning every example into a conversation.

Taught in notebook 04 (section "The data"). Whatever the shape, each example becomes messages, split into a
*prompt* (the conversation so far) and a *completion* (the last answer). The SFT trainer renders both with
the model's chat template (``chat.py`` says why never as hand-written text) and puts the loss on the
completion only. Keeping the two apart is what lets it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lora_helpers import chat

# The dataset shapes the course accepts, by the columns that identify them.
SHAPES = {
    "messages": "conversational: `messages` = [{role, content}, ...]",
    "conversations": "ShareGPT: `conversations` = [{from, value}, ...]",
    "prompt_completion": "`prompt` + `completion` text columns",
    "alpaca": "Alpaca: `instruction` (+ optional `input`) + `output`",
    "text": "`text` in Llama-2's chat format (guanaco-llama2: `<s>[INST] ... [/INST] ... </s>`)",
}
# The columns that identify each shape, in the order they are tried (``detect_shape``), and that every example of
# that shape needs (``example_problem``).
SHAPE_COLUMNS = {
    "messages": ("messages",),
    "conversations": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")
ORDER = (
    "an optional system turn first, then user and assistant turns in turn, starting with user, ending with assistant"
)


def preview(value, limit: int = 600) -> str:
    """``repr(value)``, cut to ``limit`` characters: what a notebook prints of an example, whatever its size."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text) - limit:,} more characters)"


def packaged_data_path(name: str) -> Path:
    """Path of a dataset shipped inside the package (``lora_helpers/data/``)."""
    return Path(__file__).parent / "data" / name


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def resolve_dataset_source(source: str) -> str:
    """Turn ``package:NAME`` into the shipped file's path; leave paths and hub ids alone."""
    if source.startswith("package:"):
        return str(packaged_data_path(source.removeprefix("package:")))
    return source


def load_examples(source: str, split: str = "train"):
    """Load a ``datasets.Dataset`` from a local .jsonl/.json/.csv/.parquet file or a hub id.

    Notebook 04 calls this; it fails early, with the fix, on a missing file or an empty dataset.
    """
    import datasets

    source = resolve_dataset_source(source)
    path = Path(source).expanduser()
    looks_local = path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))
    if looks_local:
        if not path.exists():
            raise FileNotFoundError(
                f"Dataset file not found: {path}. Check `dataset` (a local .jsonl/.json/.csv/.parquet "
                "file, a hub id such as 'mlabonne/guanaco-llama2-1k', or 'package:about_me.jsonl')."
            )
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"Unsupported dataset file type {path.suffix!r}; use one of {sorted(LOCAL_SUFFIXES)}.")
        if path.suffix != ".parquet":
            check_text_file(path)
        try:
            dataset = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
        except ValueError as error:  # datasets' words for a file without rows: 'corresponds to no data'
            if "no data" not in str(error):
                raise
            dataset = []
    else:
        dataset = datasets.load_dataset(source, split=split)
    if len(dataset) == 0:
        raise ValueError(f"The dataset {source!r} is empty: it needs at least one example to train on.")
    return dataset


def check_text_file(path: Path) -> None:
    """Fail, naming the line, on what ``datasets`` would report without one: a file that is not UTF-8, an empty
    file, a line of a ``.jsonl`` file that is not one JSON object."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark). Save it as UTF-8.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text ({error.reason} at byte {error.start}). Save the file as UTF-8."
        ) from None
    if not text.strip():
        raise ValueError(f"The dataset {path} is empty: it needs at least one example to train on.")
    if path.suffix != ".jsonl":
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno}). Each line of a .jsonl "
                'file is one JSON object, e.g. {"messages": [{"role": "user", "content": "..."}, ...]}.'
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object with named columns.")


def row_location(source: str, index: int) -> str:
    """Where example ``index`` (0-based) of ``source`` is, in words a person can find it by: the line of a .jsonl
    or .csv file, or the row number elsewhere."""
    path = Path(resolve_dataset_source(source)).expanduser()
    if path.suffix == ".jsonl" and path.exists():
        lines = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        if index < len(lines):
            return f"{path}, line {lines[index]}"
    if path.suffix == ".csv" and path.exists():
        return f"{path}, row {index + 1} (line {index + 2}, after the header)"
    return f"{source}, example {index + 1}"


def example_problem(example: dict, shape: str) -> str | None:
    """What is wrong with one example of a dataset of shape ``shape`` (None when nothing is)."""
    present = {key for key, value in example.items() if value is not None}
    try:
        own = detect_shape(present)
    except ValueError:
        own = None
    required = SHAPE_COLUMNS[shape]
    missing = [column for column in required if column not in present]
    if own is None and missing:
        return f"`{missing[0]}` is empty or missing: every example needs it"
    if own != shape:
        return f"this example has the shape {own!r}, the file's first has the shape {shape!r}: one shape per file"
    if shape in ("messages", "conversations"):
        turns = example[shape]
        role_key, text_key = ("role", "content") if shape == "messages" else ("from", "value")
        accepted = ROLES if shape == "messages" else tuple(SHAREGPT_ROLES)
        if not isinstance(turns, list) or not turns:
            return f"`{shape}` must be a non-empty list of turns"
        roles = []
        for number, turn in enumerate(turns, 1):
            if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
                return f"turn {number} must be an object with `{role_key}` and `{text_key}`"
            if turn[role_key] not in accepted:
                return f"turn {number} has the role {turn[role_key]!r}; the accepted roles are {', '.join(accepted)}"
            roles.append(turn[role_key] if shape == "messages" else SHAREGPT_ROLES[turn[role_key]])
            if not isinstance(turn[text_key], str) or not turn[text_key].strip():
                return (
                    f"turn {number} ({roles[-1]}) is empty: every turn needs text, and the answers are what is learned"
                )
        body = roles[1:] if roles[0] == "system" else roles
        expected = ["user", "assistant"] * (len(body) // 2 + 1)
        if not body or body != expected[: len(body)] or body[-1] != "assistant":
            return f"the turns are {' -> '.join(roles)}; the accepted order is {ORDER}"
        return None
    for column in required:
        if not isinstance(example[column], str) or not example[column].strip():
            return f"`{column}` is empty or missing: every example needs it (the answer is what is learned)"
    if shape == "text" and parse_llama2_text(example["text"]) is None:
        return (
            "the text is not in Llama-2's '<s>[INST] question [/INST] answer </s>' format, so it cannot be split "
            "into a question and an answer"
        )
    return None


def check_examples(dataset, source: str) -> str:
    """Check every example before any model is loaded; return the dataset's shape. The error names the file, the
    line (or row), what is wrong and the accepted form. Notebook 04 calls it right after loading."""
    shape = detect_shape(dataset.column_names)
    for index, example in enumerate(dataset):
        problem = example_problem(example, shape)
        if problem:
            raise ValueError(f"{row_location(source, index)}: {problem}.\nAccepted for this shape: {SHAPES[shape]}.")
    return shape


def detect_shape(columns) -> str:
    """Name the dataset's shape from its columns (a key of ``SHAPES``), or explain what is accepted."""
    columns = set(columns)
    for shape, required in SHAPE_COLUMNS.items():  # in this order: a `messages` file may have a `text` column too
        if set(required) <= columns:
            return shape
    accepted = "\n".join(f"  - {desc}" for desc in SHAPES.values())
    raise ValueError(f"The dataset's columns {sorted(columns)} fit none of the accepted shapes:\n{accepted}")


def to_messages(example: dict, shape: str) -> list[dict] | None:
    """Convert one example to a list of {role, content} messages (None for plain text)."""
    if shape == "messages":
        return [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    if shape == "conversations":
        return [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in example["conversations"]]
    if shape == "prompt_completion":
        return [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["completion"]}]
    if shape == "alpaca":
        user = example["instruction"]
        if example.get("input"):
            user = f"{user}\n\n{example['input']}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": example["output"]}]
    return None


LLAMA2_TURN = re.compile(
    r"(?:<s>)?\s*\[INST\]\s*(?:<<SYS>>\n(?P<system>.*?)\n<</SYS>>\n\n)?(?P<user>.*?)\s*\[/INST\]"
    r"(?P<answer>.*?)(?:</s>|$)",
    re.DOTALL,
)


def parse_llama2_text(text: str) -> list[dict] | None:
    """Messages from text already written in Llama-2's format (guanaco-llama2's ``<s>[INST] q [/INST] a </s>``).

    Returns None when the text is not in that format. Parsed back into messages, such data is rendered by the
    model's own chat template like every other shape: a Llama-3 model then trains in Llama-3's format.
    """
    messages, position = [], 0
    for turn in LLAMA2_TURN.finditer(text):
        if text[position : turn.start()].strip():
            return None
        if turn["system"] is not None and not messages:
            messages.append({"role": "system", "content": turn["system"].strip()})
        messages.append({"role": "user", "content": turn["user"].strip()})
        messages.append({"role": "assistant", "content": turn["answer"].strip()})
        position = turn.end()
    if not messages or text[position:].strip() or not messages[-1]["content"]:
        return None
    return messages


def conversation(example: dict, shape: str, system_prompt: str = "") -> list[dict] | None:
    """One example as a list of {role, content} messages, with the system prompt first when one is given.

    None for plain text that is not in Llama-2's format (it is trained on as it is, with no prompt).
    """
    if shape == "text":
        messages = parse_llama2_text(example["text"])
    else:
        messages = to_messages(example, shape)
    if messages is None:
        return None
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"An example does not end with an assistant turn, so there is nothing to learn: {messages}")
    return messages


def to_prompt_completion(example: dict, shape: str, system_prompt: str = "") -> dict:
    """One example in trl's conversational prompt/completion form: ``{"prompt": [...], "completion": [...]}``.

    The completion is the last assistant turn. ``SFTTrainer`` renders both with the tokenizer's chat template
    (``apply_chat_template``), so the model trains on exactly the ids it is prompted with later, and
    ``completion_only_loss`` puts the loss on the answer and its end-of-turn token only (notebook 04).
    """
    messages = conversation(example, shape, system_prompt)
    if messages is None:
        raise ValueError(
            "A text example is not in Llama-2's '<s>[INST] question [/INST] answer </s>' format, so it cannot be "
            f"split into a question and an answer: {example['text'][:200]!r}"
        )
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def question_answer(messages: list[dict]) -> tuple[str, str]:
    """(last user turn, last assistant turn) of one conversation: what exact match is measured on (notebook 06)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1].strip(), messages[-1]["content"].strip()


def question_answer_pairs(dataset, shape: str) -> list[tuple]:
    """``question_answer`` of each example that is a conversation (plain text is not): split.json's entries.

    A conversation with a system turn of its own keeps it as a third element, ``(question, answer, system)``: it
    trained with that system turn, so notebooks 04 and 06 must ask with it (``split_columns``)."""
    pairs = []
    for messages in (conversation(example, shape) for example in dataset):
        if messages is not None:
            own = [messages[0]["content"]] if messages[0]["role"] == "system" else []
            pairs.append((*question_answer(messages), *own))
    return pairs


def split_columns(entries, system_prompt: str = "") -> tuple[list[str], list[str], list[str]]:
    """split.json's entries as (questions, answers, system prompts): each question with the system turn it was
    trained with, its own or else the run's ``system_prompt``."""
    entries = [list(entry) for entry in entries]
    return (
        [entry[0] for entry in entries],
        [entry[1] for entry in entries],
        [entry[2] if len(entry) > 2 else system_prompt for entry in entries],
    )


def check_lengths(lengths: list[int], max_length: int) -> int:
    """Return how many examples exceed ``max_length``; fail when all of them do (nothing would train intact)."""
    too_long = sum(n > max_length for n in lengths)
    if lengths and too_long == len(lengths):
        raise ValueError(
            f"Every example is longer than max_length={max_length} tokens (the shortest has {min(lengths)}): "
            "each would lose the end of its answer and its EOS. Raise max_length, or use shorter examples."
        )
    return too_long


def token_ids(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one prompt/completion example, as the trainer will see them."""
    return chat.prompt_and_completion_ids(tokenizer, example["prompt"], example["completion"])


def length_report(dataset, tokenizer, max_length: int) -> dict:
    """Token lengths, and how many examples ``max_length`` truncates or drops (notebook 04, "Choosing max_length").

    Truncated: the example loses the end of its answer and its end-of-turn token. Dropped: the prompt alone
    fills ``max_length``, no answer token is left, and the example teaches nothing.
    """
    split = [token_ids(example, tokenizer) for example in dataset]
    lengths = [len(prompt) + len(completion) for prompt, completion in split]
    dropped = sum(len(prompt) >= max_length for prompt, _ in split)
    truncated = check_lengths(lengths, max_length)
    return {
        "examples": len(lengths),
        "max_length": max_length,
        "truncated": truncated - dropped,
        "dropped": dropped,
        "longest": max(lengths),
        "lengths": lengths,
    }
