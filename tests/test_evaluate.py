from lora_helpers import evaluate


def test_exact_match_rate_trims_white_space():
    assert evaluate.exact_match_rate([" a ", "b", "c"], ["a", "b", "x"]) == 2 / 3
    assert evaluate.exact_match_rate([], []) == 0.0


def test_random_base_model_answers_nothing_right(tiny_model_4bit, tiny_tokenizer):
    answers = evaluate.generate_answers(
        tiny_model_4bit, tiny_tokenizer, ["What is your name?", "Where do you live?"], "llama2", max_new_tokens=8
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert (
        evaluate.exact_match_rate(answers, ["My name is Ada Quill.", "I live in a narrow blue house in Lisbon."]) == 0
    )


def test_left_padding_gives_each_prompt_its_own_answer(tiny_model_4bit, tiny_tokenizer):
    questions = ["Hi?", "What is the oldest organ you have repaired?"]
    together = evaluate.generate_answers(tiny_model_4bit, tiny_tokenizer, questions, "llama2", max_new_tokens=6)
    alone = [
        evaluate.generate_answers(tiny_model_4bit, tiny_tokenizer, [q], "llama2", max_new_tokens=6)[0]
        for q in questions
    ]
    assert together == alone


def test_logit_difference_of_a_model_with_itself_is_zero(tiny_model_4bit, tiny_tokenizer):
    assert evaluate.max_logit_difference(tiny_model_4bit, tiny_model_4bit, tiny_tokenizer, ["Hello there"]) == 0.0
