"""GGUF export checked by a client nobody here wrote: llama.cpp, through llama-cpp-python, for every family."""

import re
import subprocess
import sys
from pathlib import Path

import llama_cpp  # from the dev extras; a missing install fails here rather than skipping
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_helpers import chat, evaluate, gguf_export, models, serving

FAMILIES = ["tiny", "tiny-llama2", "tiny-llama3"]
QUESTIONS = ["What is your name?", "Where did you grow up?"]
# Largest |logit| difference at the last position, llama.cpp against transformers (measured on the tiny models:
# F32 1.3e-3 to 2.6e-3, F16 about 6e-3, Q8_0 0.16, with logits of size ~4-10).
TOLERANCE = {"F32": 5e-3, "F16": 2e-2, "Q8_0": 0.5}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, fresh_cache, tmp_path_factory):
    directory = Path(models.resolve_model_path(request.param))
    out = tmp_path_factory.mktemp(f"gguf-{request.param}")
    exported = {t: gguf_export.export_gguf(directory, out / f"model-{t}.gguf", t) for t in gguf_export.FILE_TYPES}
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = models.load_tokenizer(request.param, chat_format="auto")
    return request.param, directory, exported, model, tokenizer


def load(path):
    """llama.cpp on the file, weight repacking off (serving.open_gguf says why)."""
    return serving.open_gguf(path, n_ctx=512)


def cpp_greedy(llm, ids, n):
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == n or llama_cpp.llama_token_is_eog(llm._model.vocab, token):
            break
    return out


@pytest.mark.parametrize("file_type", gguf_export.FILE_TYPES)
def test_llama_cpp_reads_the_chat_prompt_like_transformers(family, file_type):
    name, _, exported, model, tokenizer = family
    llm = load(exported[file_type])
    try:
        for system in ("", "Be brief."):
            for question in QUESTIONS:
                messages = chat.question_messages(question, system)
                ids = chat.prompt_ids(tokenizer, messages)
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, name
                llm.reset()
                llm.eval(ids)
                with torch.no_grad():
                    expected = model(torch.tensor([ids])).logits[0, -1].numpy()
                assert np.abs(np.array(llm.scores[len(ids) - 1]) - expected).max() < TOLERANCE[file_type]
                if file_type != "Q8_0":  # greedy continuations agree token for token
                    with torch.no_grad():
                        hf_out = model.generate(torch.tensor([ids]), **evaluate.greedy(8))[0, len(ids) :].tolist()
                    assert cpp_greedy(llm, ids, 8) == hf_out
    finally:
        llm.close()


def test_long_prompts_agree_too(family):
    """Rope at positions in the hundreds: Llama-3's scaled frequencies (rope_freqs) must be in the file."""
    _, _, exported, model, tokenizer = family
    ids = chat.prompt_ids(tokenizer, chat.question_messages("organ pipes and fishing boats " * 40))
    assert 300 < len(ids) < 512, len(ids)
    llm = load(exported["F32"])
    try:
        llm.eval(ids)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(np.array(llm.scores[len(ids) - 1]) - expected).max() < TOLERANCE["F32"]
    finally:
        llm.close()


def test_file_carries_template_special_tokens_and_family_traits(family):
    name, _, exported, model, tokenizer = family
    llm = load(exported["F16"])
    try:
        meta = llm.metadata
        assert meta["tokenizer.chat_template"] == tokenizer.chat_template
        assert llm.token_bos() == tokenizer.bos_token_id and llm.token_eos() == tokenizer.eos_token_id
        assert meta["tokenizer.ggml.model"] == ("llama" if name == "tiny-llama2" else "gpt2")
        tensors = gguf_names(exported["F16"])
        assert ("output.weight" in tensors) == (not model.config.tie_word_embeddings)  # no duplicated head
        assert ("rope_freqs.weight" in tensors) == (name == "tiny-llama3")
        if name == "tiny-llama3":  # special tokens are control tokens, kept whole by llama.cpp
            header = tokenizer.convert_tokens_to_ids("<|start_header_id|>")
            assert llm.tokenize(b"<|start_header_id|>user", add_bos=False, special=True)[0] == header
            assert llama_cpp.llama_token_is_eog(llm._model.vocab, tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    finally:
        llm.close()


def gguf_names(path):
    import gguf

    return {t.name for t in gguf.GGUFReader(path).tensors}


def test_q4_k_m_from_llama_cpp_quantizer(family, tmp_path):
    _, _, exported, _, _ = family
    path = gguf_export.quantize_gguf(exported["F16"], tmp_path / "model-Q4_K_M.gguf")
    assert path.stat().st_size < exported["Q8_0"].stat().st_size
    llm = load(path)
    try:
        assert llm.n_vocab() == 1024
    finally:
        llm.close()


def test_sizes_shrink_with_the_file_type(family):
    _, _, exported, _, _ = family
    sizes = [exported[t].stat().st_size for t in ("F32", "F16", "Q8_0")]
    assert sizes[0] > sizes[1] > sizes[2]


def render_ollama(template: str, system: str, prompt: str) -> str:
    """Ollama's Go template language, as far as the Modelfile uses it: ``{{ if .System }}...{{ end }}`` and values."""
    template = re.sub(
        r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}", lambda m: m[1] if system else "", template, flags=re.S
    )
    return template.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


def test_modelfile_prompts_like_the_chat_template(family, tmp_path):
    name, directory, exported, _, tokenizer = family
    tokenizer.save_pretrained(tmp_path)  # the merged folder: the tokenizer, with the template, and the configs
    for file in ("config.json", "generation_config.json"):
        (tmp_path / file).write_text((directory / file).read_text())
    text = gguf_export.write_modelfile(exported["F16"], tmp_path / "Modelfile", tmp_path, "Be brief.").read_text()
    assert text.startswith("FROM ./model-F16.gguf\n") and 'SYSTEM """Be brief."""' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S)[1]
    for system in ("", "Be brief."):
        messages = chat.question_messages("Where do you live?", system)
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.bos_token + render_ollama(template, system, "Where do you live?") == expected
    stops = re.findall(r'PARAMETER stop "(.*?)"', text)
    assert stops == (["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"] if name == "tiny-llama3" else ["</s>"])


def test_other_architectures_are_sent_to_llama_cpp_converter(tmp_path):
    from transformers import GPTNeoXConfig

    GPTNeoXConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="convert_hf_to_gguf.py"):
        gguf_export.export_gguf(tmp_path, tmp_path / "x.gguf")


def test_permutation_interleaves_the_rotary_halves():
    """Per head, transformers keeps rows (x_0..x_{d/2-1}, y_0..y_{d/2-1}); llama.cpp wants (x_0, y_0, x_1, y_1, ...)."""
    head_dim, n_head = 4, 2
    weight = np.arange(n_head * head_dim, dtype=np.float32)[:, None].repeat(3, axis=1)
    permuted = gguf_export.permute_for_rope(weight, n_head=n_head)
    assert permuted[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_export_holds_about_one_tensor_in_memory(tmp_path):
    """A 130 MB model in 4 shards exports with well under its size of extra memory (Colab: 12.7 GB for 13-16 GB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_helpers import tiny

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        vocab_size=1024,
        tie_word_embeddings=False,
    )
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir, max_shard_size="40MB")
    tiny.build_tokenizer().save_pretrained(model_dir)
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert size > 120e6 and len(list(model_dir.glob("*.safetensors"))) >= 4
    script = (
        "import resource, sys; from lora_helpers import gguf_export; import torch, gguf, transformers;"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "gguf_export.export_gguf(sys.argv[1], sys.argv[2], 'F32');"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(model_dir), str(tmp_path / "m.gguf")],
        capture_output=True,
        text=True,
        check=True,
    )
    grown = int(out.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    assert grown < 0.35 * size, (grown, size)  # loading the weights whole would take at least their size
    assert (tmp_path / "m.gguf").stat().st_size > size * 0.95


@pytest.mark.parametrize("shape", ["llama-2-7b", "llama-3.1-8b"])
def test_a_vocabulary_larger_than_the_tokenizer_is_padded(small_real_size, shape, tmp_path):
    """The real-size models (the runner's --random-weights) have 32000 / 128256 embedding rows and a tiny twin's
    tokenizer; llama.cpp wants one token per row, so the export pads with unused placeholders, as its converter does."""
    from lora_helpers import tiny

    directory = tiny.real_size_model_dir(shape)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = models.load_tokenizer(str(directory), chat_format="auto")
    llm = load(gguf_export.export_gguf(directory, tmp_path / "model-F32.gguf", "F32"))
    assert llm.n_vocab() == model.config.vocab_size > len(tokenizer)
    messages = chat.question_messages(QUESTIONS[0], "")
    ids = chat.prompt_ids(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0, -1]
    assert (torch.tensor(llm.scores[len(ids) - 1]) - reference).abs().max() < TOLERANCE["F32"]
    llm.close()
