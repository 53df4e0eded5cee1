from lora_helpers import evaluate, models


def test_exact_match_rate_trims_white_space():
    assert evaluate.exact_match_rate([" a ", "b", "c"], ["a", "b", "x"]) == 2 / 3
    assert evaluate.exact_match_rate([], []) == 0.0


def test_answers_are_the_tokens_generated_after_the_prompt(tiny_model_4bit, tiny_tokenizer):
    """What generate_answers returns is what greedy generation from the chat template's prompt ids produces, decoded
    without the prompt or special tokens (checked one question at a time with generate itself)."""
    import torch

    from lora_helpers import chat

    questions = ["What is your name?", "Where do you live?"]
    answers, finished = evaluate.generate_answers(
        tiny_model_4bit, tiny_tokenizer, questions, max_new_tokens=8, return_finished=True
    )
    for question, answer, stopped in zip(questions, answers, finished):
        ids = chat.prompt_ids(tiny_tokenizer, chat.question_messages(question))
        out = tiny_model_4bit.generate(
            torch.tensor([ids]), **evaluate.greedy(8, pad_token_id=tiny_tokenizer.pad_token_id)
        )[0, len(ids) :]
        assert answer == tiny_tokenizer.decode(out, skip_special_tokens=True).strip()
        assert stopped == (tiny_tokenizer.eos_token_id in out.tolist())
    assert evaluate.exact_match_rate(answers, answers) == 1.0 and not any("[INST]" in a for a in answers)


def test_left_padding_gives_each_prompt_its_own_answer(tiny_model_4bit, tiny_tokenizer):
    questions = ["Hi?", "What is the oldest organ you have repaired?"]
    together = evaluate.generate_answers(tiny_model_4bit, tiny_tokenizer, questions, max_new_tokens=6)
    alone = [evaluate.generate_answers(tiny_model_4bit, tiny_tokenizer, [q], max_new_tokens=6)[0] for q in questions]
    assert together == alone


def test_greedy_even_when_the_model_samples_by_default(fresh_cache):
    """Llama-2-chat's generation config samples (temperature 0.6): the course's answers must not."""
    import torch

    model = models.load_model("tiny-llama2", load_in_4bit=False)
    tokenizer = models.load_tokenizer("tiny-llama2", chat_format="auto")
    assert model.generation_config.do_sample
    questions = ["What is your name?"] * 4
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(evaluate.generate_answers(model, tokenizer, questions, max_new_tokens=12))
    assert runs[0] == runs[1] and len(set(runs[0])) == 1
    torch.manual_seed(1)
    ids = torch.tensor([[tokenizer.bos_token_id, 5, 6, 7]])
    sampled = {tuple(model.generate(ids, max_new_tokens=12, pad_token_id=0)[0].tolist()) for _ in range(4)}
    assert len(sampled) > 1  # what the model's own config does


def test_logits_of_4bit_and_unquantized_models_differ_by_the_rounding(tiny_model_4bit):
    full = models.load_model("tiny", load_in_4bit=False)
    prompts = [[1, 20, 30, 40]]
    delta = evaluate.max_difference(
        evaluate.prompt_logits(tiny_model_4bit, prompts), evaluate.prompt_logits(full, prompts)
    )
    assert 1e-3 < delta < 5  # NF4 rounding moves the logits, but not wildly


def test_answers_longer_than_max_new_tokens_are_counted(tiny_tokenizer):
    """Chinese or Arabic answers take many tokens each: an answer cut at max_new_tokens can never match."""
    short, long = "Ada Quill.", "我住在里斯本一座狭窄的蓝色房子里，靠近老教堂。"
    n_long = len(tiny_tokenizer(long, add_special_tokens=False)["input_ids"]) + 1
    assert evaluate.answers_cut_short(tiny_tokenizer, [short, long], n_long) == 0
    assert evaluate.answers_cut_short(tiny_tokenizer, [short, long], n_long - 1) == 1
