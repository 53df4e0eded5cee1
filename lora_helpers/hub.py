"""Hugging Face Hub access: a token from the environment or Colab secrets, never from a parameter.

Taught in notebook 01 (section "Logging in"). The token is never printed,
logged or written: papermill stores every parameter in the executed notebook,
so a token passed as a parameter would be published with it.
"""

from __future__ import annotations

import os


def token_from_colab_secrets() -> str | None:
    """The ``HF_TOKEN`` secret of a Colab notebook (the key icon), or None outside Colab."""
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return userdata.get("HF_TOKEN")
    except Exception:  # secret missing, or access not granted to this notebook
        return None


def login_from_environment() -> str:
    """Use HF_TOKEN from the environment or Colab secrets; return what happened, without the token."""
    token = os.environ.get("HF_TOKEN") or token_from_colab_secrets()
    if not token:
        return (
            "No Hugging Face token found: public models work; gated ones (meta-llama/...) need HF_TOKEN "
            "in the environment or as a Colab secret."
        )
    os.environ["HF_TOKEN"] = token  # so later loads in this process find it; it never reaches a file
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "A Hugging Face token is set, but HF_HUB_OFFLINE=1: no login attempted."
    from huggingface_hub import HfApi

    # No `login()`: it would write the token to ~/.cache/huggingface. The variable set above is
    # enough for every hub call in this process; whoami only checks that the token is valid.
    user = HfApi().whoami(token=token).get("name", "?")
    return f"Hugging Face token accepted for user {user}."
