"""Shared test setup: offline, a fresh model cache, and the tiny model built once per session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the tests must never need the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite is CI's, and CI has no GPU: hide any GPU before torch looks, so that a machine with CUDA runs the same
# CPU paths (and the shaped-benchmark test never starts a 7B run). Tests marked `gpu` need one: they run only with
# LORA_COURSE_GPU_TESTS=1, which leaves CUDA visible.
GPU_TESTS = os.environ.get("LORA_COURSE_GPU_TESTS") == "1"
if not GPU_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a GPU: run with LORA_COURSE_GPU_TESTS=1 on a machine with CUDA")
    for item in items:
        if "gpu" in item.keywords and not GPU_TESTS:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def fresh_cache(tmp_path_factory):
    """Build the tiny model into a cache of the test session's own, as on a fresh machine."""
    os.environ["LORA_HELPERS_CACHE"] = str(tmp_path_factory.mktemp("lora_helpers_cache"))
    yield


FAKE_TOKEN = "hf_FakeTokenForLeakTest0123456789abcdef"


@pytest.fixture(scope="session")
def tiny_course_run(tmp_path_factory, fresh_cache):
    """The whole course on `tiny`, run once per session with a (fake) Hub token in the environment, as a learner on
    Colab would have one: test_course_run.py checks it, test_reliability.py works on copies of it."""
    run_dir = tmp_path_factory.mktemp("course_run-tiny") / "run"
    return run_dir, run_course_with_fake_token("tiny", run_dir, params={"epochs_per_point": 10})


def run_course_with_fake_token(preset: str, run_dir, **options) -> dict:
    """``course.run_course`` with a (fake) Hub token in the environment, as a learner on Colab has one."""
    from lora_helpers import course

    saved = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = FAKE_TOKEN
    try:
        return course.run_course(preset, run_dir, **options)
    finally:
        if saved is None:
            os.environ.pop("HF_TOKEN")
        else:
            os.environ["HF_TOKEN"] = saved


@pytest.fixture(scope="session")
def tiny_dir(fresh_cache):
    from lora_helpers import tiny

    return tiny.tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from lora_helpers import models

    return models.load_tokenizer("tiny")


@pytest.fixture()
def tiny_model_4bit(tiny_dir):
    from lora_helpers import models

    return models.load_model("tiny", load_in_4bit=True)


@pytest.fixture()
def small_real_size(monkeypatch):
    """The real-size models with their depth and width shrunk (a 7B one is a GPU's work): the vocabulary size,
    the family's tokenizer, template, special ids and rope stay those of the real model."""
    from lora_helpers import tiny

    real = tiny.shipped_config
    small = dict(tiny.SHRUNK, num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setattr(tiny, "shipped_config", lambda name, **changes: real(name, **{**changes, **small}))
