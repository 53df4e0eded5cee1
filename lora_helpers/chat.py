"""Chat formats and the tokenizer rules around them: one tokenization for training and inference.

Taught in notebook 02 (the pad token) and notebook 04 (the chat format). A chat model answers best when it is
prompted with the very token ids it was trained on. The course therefore renders every conversation with the
tokenizer's own chat template, through ``apply_chat_template``, in training (``SFTTrainer`` does it for
conversational data), in generation, and in what the exported files carry (``pipeline`` with messages,
vLLM, TGI, llama.cpp and Ollama all prompt through that template).

Why not write ``"<s>[INST] question [/INST]"`` as text and tokenize it? With a SentencePiece tokenizer
(Llama-2), text is split differently depending on what comes before it: ``"[INST]"`` at the start of a text
becomes ``▁[``, ``INST``, ``]``, but right after the special token ``<s>`` it becomes ``[``, ``INST``, ``]``.
Two spellings of "the same prompt" give different ids, and a model trained on one answers the other poorly.
Asking the template for ids, every time, removes the choice.
"""

from __future__ import annotations

import warnings

CHAT_FORMATS = ("auto", "template", "llama2")

# The Llama-2 chat template as Meta's tokenizers ship it: `<s>[INST] user [/INST] answer </s>`,
# with an optional `<<SYS>>` block inside the first user turn.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Pad tokens that a vocabulary may already hold, in order of preference; none of them occurs in real text.
PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>", "<|padding|>", "[PAD]")


def use_chat_format(tokenizer, chat_format: str = "auto") -> str:
    """Set the chat template that training and generation will use; return the format in use.

    ``"auto"``: the tokenizer's own template, or Llama-2's for a model that has none (a base model).
    ``"template"``: the tokenizer's own, which must exist. ``"llama2"``: Llama-2's, whatever the tokenizer has.
    The template is saved with the tokenizer, so the adapter, the merged model and the GGUF file carry it.
    """
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format={chat_format!r}: use one of {CHAT_FORMATS}.")
    has_template = bool(tokenizer.chat_template)
    if chat_format == "template" and not has_template:
        raise ValueError(
            "chat_format='template', but this tokenizer has no chat template (a base model?). "
            "Use chat_format='auto' or 'llama2' to train it in the Llama-2 format."
        )
    if chat_format == "llama2" or (chat_format == "auto" and not has_template):
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
        return "llama2"
    return "template"


def question_messages(question: str, system_prompt: str = "") -> list[dict]:
    """One user turn, after the system prompt when there is one."""
    messages = [{"role": "user", "content": question}]
    return [{"role": "system", "content": system_prompt}, *messages] if system_prompt else messages


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The token ids of ``messages`` as the tokenizer's chat template renders them (special tokens included)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """What the model is given to answer: the conversation so far plus the assistant's header."""
    return template_ids(tokenizer, messages, add_generation_prompt=True)


def prompt_and_completion_ids(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """Ids of the prompt and of the answer that follows it, as ``SFTTrainer`` builds them for training.

    The answer's ids are the template's ids of the whole conversation after the prompt's: the answer and the
    family's end-of-turn token (``</s>`` for Llama-2, ``<|eot_id|>`` for Llama-3).
    """
    head = prompt_ids(tokenizer, prompt)
    full = template_ids(tokenizer, prompt + completion)
    if full[: len(head)] != head:
        raise ValueError(
            "This chat template renders a prompt differently on its own than at the start of the whole "
            "conversation, so the answer cannot be cut from it. Use chat_format='llama2'."
        )
    return head, full[len(head) :]


def end_of_turn(tokenizer, completion_ids: list[int]) -> tuple[bool, str]:
    """Does an answer's ids end the turn with EOS, and what does the template write after it? (Notebook 04.)

    Llama-2 and Llama-3 end the answer with the EOS token itself; ChatML (SmolLM2, Qwen) writes a newline after
    ``<|im_end|>``, which the model also learns but never generates: generation stops at EOS.
    """
    eos = tokenizer.eos_token_id
    if eos not in completion_ids:
        return False, ""
    last = len(completion_ids) - 1 - completion_ids[::-1].index(eos)
    after = tokenizer.decode(completion_ids[last + 1 :])
    return not after.strip(), after


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when ``tokenizer(text)`` puts BOS in front by itself (Llama tokenizers do)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def choose_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token that is not EOS, and return it. Taught in notebook 02.

    With ``pad_token = eos_token`` (as most tutorials write), the language-modelling collator masks every pad
    position out of the loss, and with it the real EOS, so the model never learns to stop. In order:
    the tokenizer's own pad token; a pad token already in the vocabulary (Llama-3 reserves
    ``<|finetune_right_pad_id|>``); ``<unk>`` (Llama-2), which never occurs in text a byte-fallback
    tokenizer encodes. Only when none exists is a new ``<pad>`` token added: the model's embeddings then
    grow by one row (``models.match_vocabulary``), and the adapter must be saved with them.
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and candidate != eos:
            tokenizer.pad_token = candidate
            return candidate
    if tokenizer.unk_token is not None and tokenizer.unk_token not in (eos, tokenizer.bos_token):
        tokenizer.pad_token = tokenizer.unk_token
        return tokenizer.unk_token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return "<pad>"
