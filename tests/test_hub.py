from lora_helpers import hub


def test_without_a_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "No Hugging Face token" in hub.login_from_environment()


def test_token_is_never_in_the_message(monkeypatch):
    fake = "hf_FAKEtoken1234567890abcdef"
    monkeypatch.setenv("HF_TOKEN", fake)
    message = hub.login_from_environment()
    assert "HF_HUB_OFFLINE=1" in message and fake not in message
