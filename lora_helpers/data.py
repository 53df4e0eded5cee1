"""Datasets: loading, recognising their shape, and writing them in the model's chat format.

Taught in notebook 04 (section "The data"). The SFT trainer learns from
``prompt`` + ``completion`` text pairs: the prompt is everything the model is
shown, the completion is what it must learn to write, ending with EOS. Keeping
the two apart is what lets the trainer put the loss on the answer only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

# The dataset shapes the course accepts, by the columns that identify them.
SHAPES = {
    "messages": "conversational: `messages` = [{role, content}, ...]",
    "conversations": "ShareGPT: `conversations` = [{from, value}, ...]",
    "prompt_completion": "`prompt` + `completion` text columns",
    "alpaca": "Alpaca: `instruction` (+ optional `input`) + `output`",
    "text": "plain `text`, already formatted (e.g. guanaco-llama2: `<s>[INST] ... [/INST] ... </s>`)",
}
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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


def detect_shape(columns) -> str:
    """Name the dataset's shape from its columns (a key of ``SHAPES``), or explain what is accepted."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "conversations"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if "text" in columns:
        return "text"
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


def format_llama2(messages: list[dict], bos: str = "<s>", eos: str = "</s>") -> str:
    """Llama-2 chat format: ``<s>[INST] <<SYS>>\\nsys\\n<</SYS>>\\n\\nuser [/INST] answer </s>`` per turn.

    Written out in Python so the format is visible; it renders exactly what
    Meta's Llama-2 chat template renders (tested against the tiny tokenizer's).
    """
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = []
    for i, message in enumerate(messages):
        content = message["content"].strip()
        if message["role"] == "user":
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            out.append(f"{bos}[INST] {content} [/INST]")
        else:
            out.append(f" {content} {eos}")
    return "".join(out)


def render_chat(messages: list[dict], tokenizer, chat_format: str, add_generation_prompt: bool = False) -> str:
    """Render messages as text: ``llama2`` by the function above, ``template`` by the tokenizer's template."""
    if chat_format not in ("llama2", "template"):
        raise ValueError(f"Unknown chat_format {chat_format!r}: use 'llama2' or 'template'.")
    if chat_format == "template":
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # Base models: the documented default is the Llama-2 format.
        warnings.warn(
            "This tokenizer has no chat template (a base model?): using the Llama-2 format. "
            "Use the same chat_format when you generate.",
            stacklevel=2,
        )
    return format_llama2(messages, tokenizer.bos_token or "<s>", tokenizer.eos_token or "</s>")


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when ``tokenizer(text)`` puts BOS in front by itself (Llama tokenizers do)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def strip_leading_bos(text: str, tokenizer) -> str:
    """Drop a leading BOS string when the tokenizer adds BOS itself, so it is not there twice."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer_adds_bos(tokenizer):
        return text[len(bos) :]
    return text


def to_prompt_completion(example: dict, shape: str, tokenizer, chat_format: str, system_prompt: str = "") -> dict:
    """One example as ``{"prompt", "completion"}`` text: the completion is the last assistant turn + EOS.

    Text-shaped examples (already formatted) are split at their last ``[/INST]``
    when they have one, so the loss can still fall on the answer only.
    """
    if shape == "text":
        text = strip_leading_bos(example["text"], tokenizer)
        head, sep, tail = text.rpartition("[/INST]")
        if sep:
            return {"prompt": head + sep, "completion": tail}
        return {"prompt": "", "completion": text}
    messages = to_messages(example, shape)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"An example does not end with an assistant turn, so there is nothing to learn: {messages}")
    prompt = render_chat(messages[:-1], tokenizer, chat_format, add_generation_prompt=True)
    full = render_chat(messages, tokenizer, chat_format)
    if not full.startswith(prompt):
        raise ValueError("The chat template renders the prompt differently on its own; use chat_format='llama2'.")
    return {"prompt": strip_leading_bos(prompt, tokenizer), "completion": full[len(prompt) :]}


def prompt_for_generation(question: str, tokenizer, chat_format: str, system_prompt: str = "") -> str:
    """The text a model is given to answer ``question`` (what notebooks 04 and 06 generate from)."""
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return strip_leading_bos(render_chat(messages, tokenizer, chat_format, add_generation_prompt=True), tokenizer)


def question_answer_pairs(dataset, shape: str) -> list[tuple[str, str]]:
    """(last user turn, last assistant turn) of each example: what exact-match is measured on."""
    pairs = []
    for example in dataset:
        if shape == "text":
            head, sep, tail = example["text"].rpartition("[/INST]")
            if not sep:
                continue
            question = head.rsplit("[INST]", 1)[-1].strip()
            pairs.append((question, tail.replace("</s>", "").strip()))
            continue
        messages = to_messages(example, shape)
        users = [m["content"] for m in messages if m["role"] == "user"]
        pairs.append((users[-1], messages[-1]["content"].strip()))
    return pairs


def choose_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token that is not EOS, and return which one was chosen.

    Notebook 02 explains why: with ``pad_token = eos_token`` (as in the seeds),
    the language-modelling collator masks every pad position out of the loss,
    and with it the real EOS, so the model never learns to stop. Order of choice:
    the tokenizer's own pad token, a reserved pad token in the vocabulary
    (Llama-3 has ``<|finetune_right_pad_id|>``), then ``<unk>`` (Llama-2).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for candidate in ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>", "[PAD]"):
        if candidate in vocab and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            return candidate
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
        return tokenizer.unk_token
    raise ValueError(
        "This tokenizer has no token to pad with other than EOS. Add one with "
        "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and model.resize_token_embeddings(len(tokenizer))."
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


def token_lengths(dataset, tokenizer) -> list[int]:
    """Tokens per prompt + completion example, as the trainer will see them (notebook 04's length check)."""
    return [len(tokenizer(ex["prompt"] + ex["completion"])["input_ids"]) for ex in dataset]


def length_report(dataset, tokenizer, max_length: int) -> dict:
    """Token lengths, and how many examples ``max_length`` truncates or drops (notebook 04, "Choosing max_length").

    Truncated: the example loses the end of its answer and its EOS. Dropped: the prompt alone fills
    ``max_length``, no answer token is left, and the trainer skips the example.
    """
    lengths = token_lengths(dataset, tokenizer)
    dropped = sum(len(tokenizer(example["prompt"])["input_ids"]) >= max_length for example in dataset)
    truncated = check_lengths(lengths, max_length)
    return {
        "examples": len(lengths),
        "max_length": max_length,
        "truncated": truncated - dropped,
        "dropped": dropped,
        "longest": max(lengths),
        "lengths": lengths,
    }
