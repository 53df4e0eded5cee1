"""GGUF export checked by a client nobody here wrote: llama.cpp, through llama-cpp-python."""

import llama_cpp  # from the dev extras; a missing install fails here rather than skipping
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_helpers import gguf_export

PROMPTS = ["[INST] What is your name? [/INST]", "[INST] Where did you grow up? [/INST] In a fishing village"]
# Largest |logit| difference at the last position, llama.cpp against transformers (measured on the tiny model:
# F32 1.4e-3, F16 6e-3, Q8_0 0.16, with logits of size ~10).
TOLERANCE = {"F32": 5e-3, "F16": 2e-2, "Q8_0": 0.5}


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: gguf_export.export_gguf(tiny_dir, out / f"model-{t}.gguf", t) for t in gguf_export.FILE_TYPES}


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


def load(path):
    return llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=256, seed=0)


@pytest.mark.parametrize("file_type", gguf_export.FILE_TYPES)
def test_llama_cpp_reads_the_file_like_transformers(exported, reference, file_type):
    model, tokenizer = reference
    llm = load(exported[file_type])
    try:
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
            llm.reset()
            llm.eval(ids)
            with torch.no_grad():
                expected = model(torch.tensor([ids])).logits[0, -1].numpy()
            assert np.abs(np.array(llm.scores[len(ids) - 1]) - expected).max() < TOLERANCE[file_type]
            if file_type != "Q8_0":  # greedy continuations agree token for token
                with torch.no_grad():
                    hf_out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
                llm.reset()
                cpp_out = []
                for token in llm.generate(ids, temp=0.0, top_k=1):
                    cpp_out.append(token)
                    if len(cpp_out) == 8 or token == llm.token_eos():
                        break
                assert cpp_out == hf_out.tolist()[: len(cpp_out)] and len(cpp_out) == len(hf_out)
    finally:
        llm.close()


def test_file_carries_the_chat_template_and_special_tokens(exported, reference):
    _, tokenizer = reference
    llm = load(exported["F16"])
    try:
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        assert llm.token_eos() == tokenizer.eos_token_id and llm.token_bos() == tokenizer.bos_token_id
    finally:
        llm.close()


def test_q4_k_m_from_llama_cpp_quantizer(exported, tmp_path):
    path = gguf_export.quantize_gguf(exported["F16"], tmp_path / "model-Q4_K_M.gguf")
    assert path.stat().st_size < exported["Q8_0"].stat().st_size
    llm = load(path)
    try:
        assert llm.n_vocab() == 1024
    finally:
        llm.close()


def test_sizes_shrink_with_the_file_type(exported):
    sizes = [exported[t].stat().st_size for t in ("F32", "F16", "Q8_0")]
    assert sizes[0] > sizes[1] > sizes[2]


def test_modelfile_for_ollama(exported, tmp_path):
    text = gguf_export.write_modelfile(exported["F16"], tmp_path / "Modelfile", "llama2", "Be brief.").read_text()
    assert text.startswith("FROM ./model-F16.gguf\n")
    assert "[INST]" in text and "<<SYS>>" in text and 'PARAMETER stop "</s>"' in text and "Be brief." in text


def test_permutation_round_trip():
    weight = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    permuted = gguf_export.permute_for_rope(weight, n_head=2)
    assert permuted.shape == weight.shape and not np.array_equal(permuted, weight)
    assert np.array_equal(np.sort(permuted, axis=None), np.sort(weight, axis=None))


def test_sentencepiece_tokenizers_are_sent_to_llama_cpp_converter():
    with pytest.raises(ValueError, match="convert_hf_to_gguf.py"):
        gguf_export.pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})
