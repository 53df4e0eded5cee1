from lora_helpers import hub


def test_without_a_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "No Hugging Face token" in hub.login_from_environment()


def test_token_is_never_in_the_message(monkeypatch):
    fake = "hf_FAKEtoken1234567890abcdef"
    monkeypatch.setenv("HF_TOKEN", fake)
    message = hub.login_from_environment()
    assert "HF_HUB_OFFLINE=1" in message and fake not in message


def test_no_network_is_said_in_words_not_a_traceback(monkeypatch):
    """Notebook 01 with a token set and the network down once ended in `ConnectError: Name or service not known`."""
    from huggingface_hub import HfApi, errors

    client = __import__(errors.Response.__module__.split(".")[0])  # the HTTP client huggingface_hub uses
    fake = "hf_FAKEtoken1234567890abcdef"

    def unreachable(self, token=None, **kwargs):
        raise client.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setenv("HF_TOKEN", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "whoami", unreachable)
    message = hub.login_from_environment()
    assert "could not be reached (ConnectError: [Errno -2] Name or service not known)" in message
    assert "HF_HUB_OFFLINE=1" in message and fake not in message


def test_push_only_when_asked_with_a_token_and_online(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "push_to_hub is False" in hub.push_adapter(tmp_path, "me/adapter", push=False)
    assert "hub_repo_id is empty" in hub.push_adapter(tmp_path, "", push=True)
    assert "no token" in hub.push_adapter(tmp_path, "me/adapter", push=True)
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtoken1234567890abcdef")
    message = hub.push_adapter(tmp_path, "me/adapter", push=True)
    assert "offline" in message and "hf_FAKE" not in message


def test_every_notebook_finds_the_colab_secret(monkeypatch):
    """On Colab each notebook is its own runtime, and no cell passes a token: the course relies on huggingface_hub
    reading the Colab secret by itself (``get_token()``, which ``from_pretrained`` and the push use)."""
    import sys
    import types

    import huggingface_hub
    from huggingface_hub.utils import _auth

    class NotebookAccessError(Exception):
        pass

    class SecretNotFoundError(Exception):
        pass

    def secret(name):
        if name != "HF_TOKEN":
            raise SecretNotFoundError(name)
        return "hf_FromColabSecret"

    userdata = types.SimpleNamespace(
        get=secret, NotebookAccessError=NotebookAccessError, SecretNotFoundError=SecretNotFoundError
    )
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    errors = types.ModuleType("google.colab.errors")
    errors.Error = Exception
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    monkeypatch.setitem(sys.modules, "google.colab.errors", errors)
    monkeypatch.setattr(_auth, "is_google_colab", lambda: True)
    monkeypatch.setattr(_auth, "is_colab_enterprise", lambda: False)
    monkeypatch.setattr(_auth, "_IS_GOOGLE_COLAB_CHECKED", False)
    monkeypatch.setattr(_auth, "_GOOGLE_COLAB_SECRET", None)
    monkeypatch.setattr(_auth, "_get_token_from_file_refreshed", lambda: None)  # no login on this machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert huggingface_hub.get_token() == "hf_FromColabSecret"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = hub.login_from_environment()
    assert "token is set" in message and "hf_From" not in message


def test_model_card_metadata_is_valid_and_names_the_base(tmp_path):
    import json

    from huggingface_hub import ModelCard

    from lora_helpers import presets

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["v_proj", "q_proj"]})
    )
    (tmp_path / "training_log.json").write_text(json.dumps({"final_train_loss": 0.25}))
    settings = presets.resolve_settings("llama2-7b-guanaco")
    card = ModelCard.load(hub.write_model_card(tmp_path, settings))
    assert card.data.library_name == "peft" and card.data.base_model == "NousResearch/Llama-2-7b-chat-hf"
    assert card.data.datasets == ["mlabonne/guanaco-llama2-1k"] and "qlora" in card.data.tags
    assert "r=8, alpha=32" in card.text and "0.2500" in card.text and "HF_TOKEN" not in card.text
    tiny_card = ModelCard.load(hub.write_model_card(tmp_path, presets.resolve_settings("tiny")))
    assert tiny_card.data.base_model is None and tiny_card.data.datasets is None  # nothing on the Hub to link
