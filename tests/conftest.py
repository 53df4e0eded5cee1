"""Shared test setup: offline, a fresh model cache, and the tiny model built once per session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the tests must never need the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def fresh_cache(tmp_path_factory):
    """Build the tiny model into a cache of the test session's own, as on a fresh machine."""
    os.environ["LORA_HELPERS_CACHE"] = str(tmp_path_factory.mktemp("lora_helpers_cache"))
    yield


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
