from lora_helpers import hub


def test_without_a_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "No Hugging Face token" in hub.login_from_environment()


def test_token_is_never_in_the_message(monkeypatch):
    fake = "hf_FAKEtoken1234567890abcdef"
    monkeypatch.setenv("HF_TOKEN", fake)
    message = hub.login_from_environment()
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
    """On Colab each notebook is its own runtime: model loads must read the secret themselves, not rely on 01."""
    import sys
    import types

    from lora_helpers import models

    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: "hf_FromColabSecret" if name == "HF_TOKEN" else None)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert models.hub_token() == "hf_FromColabSecret"
