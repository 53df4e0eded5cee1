"""Hugging Face Hub access: the token huggingface_hub finds by itself (environment, login, Colab secret), never a parameter.

Taught in notebook 01 (section "Logging in"). The token is never printed,
logged or written: papermill stores every parameter in the executed notebook,
so a token passed as a parameter would be published with it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_helpers import files


def login_from_environment() -> str:
    """Check the Hub token huggingface_hub finds by itself; return what happened, without the token.

    ``huggingface_hub.get_token()`` reads ``HF_TOKEN``, then the file ``hf auth login`` writes, then the Colab secret
    named ``HF_TOKEN``; ``from_pretrained`` and every other Hub call read it the same way, so no notebook passes a
    token, and each Colab notebook (its own runtime) finds it again.
    """
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        return (
            "No Hugging Face token found: public models work; gated ones (meta-llama/...) need HF_TOKEN "
            "in the environment or as a Colab secret."
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "A Hugging Face token is set, but HF_HUB_OFFLINE=1: no login attempted."
    # No `login()`: it would write the token to ~/.cache/huggingface. whoami only checks that the token is valid.
    from huggingface_hub.errors import HfHubHTTPError

    try:
        user = HfApi().whoami(token=token).get("name", "?")
    except HfHubHTTPError as error:  # the Hub answered: the token is wrong or revoked
        status = getattr(error.response, "status_code", "?")
        return f"The Hub rejected the Hugging Face token (HTTP {status}): create a new one and set HF_TOKEN again."
    except Exception as error:  # no answer: no network, no DNS, a proxy (httpx's errors, whatever their class)
        cause = (str(error).strip().splitlines() or [""])[0]
        return (
            f"A Hugging Face token is set, but the Hub could not be reached ({type(error).__name__}: {cause}). "
            "Check the network; to work from models already downloaded, set HF_HUB_OFFLINE=1."
        )
    return f"Hugging Face token accepted for user {user}."


def write_model_card(run_dir, settings, adapter_dir=None) -> Path:
    """Write ``adapter/README.md``: base model, data, LoRA settings, losses, exact match, the loss plot (notebook 06).

    The metadata block is written and validated by huggingface_hub's ``ModelCardData``. Nothing secret goes in:
    the card is built from the run's own files, never from the environment.
    """
    import json
    import shutil

    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir)
    adapter_dir = Path(adapter_dir or run_dir / "adapter")
    log = files.read_json(run_dir / "training_log.json", missing={})
    evaluation = files.read_json(run_dir / "eval.json", missing={})
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    built_here = settings.model_id.startswith("tiny")
    base = f"{settings.model_id} (a random-weight model built by lora_helpers)" if built_here else settings.model_id
    on_hub = "/" in settings.dataset and not settings.dataset.startswith(("package:", "/", "."))
    if (run_dir / "loss.png").exists():
        shutil.copyfile(run_dir / "loss.png", adapter_dir / "loss.png")

    def number(value):
        return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"

    metadata = ModelCardData(
        library_name="peft",
        base_model=None if built_here else settings.model_id,
        datasets=[settings.dataset] if on_hub else None,
        tags=["lora", "qlora", "trl", "sft"],
    )
    content = f"""---
{metadata.to_yaml()}
---

# LoRA adapter for {base}

Trained with the LoRA / QLoRA course (preset `{settings.preset}`), {"on a 4-bit NF4 base (QLoRA)" if settings.load_in_4bit else "on an unquantized base"}.

| | |
|---|---|
| base model | `{settings.model_id}` |
| dataset | `{settings.dataset}` (chat format: {settings.chat_format}; loss on the answers only: {settings.completion_only_loss}) |
| LoRA | r={config["r"]}, alpha={config["lora_alpha"]}, dropout={config["lora_dropout"]}, targets: {", ".join(sorted(config["target_modules"]))} |
| training | {settings.num_train_epochs} epochs, learning rate {settings.learning_rate:g}, batch {settings.per_device_train_batch_size} x {settings.gradient_accumulation_steps} accumulation, max_length {settings.max_length} |
| final train loss | {number(log.get("final_train_loss"))} |
| final eval loss | {number(log.get("final_eval_loss"))} (perplexity {number(log.get("final_eval_perplexity"))}) |
| greedy exact match on the training questions | base {number(evaluation.get("base"))}, fine-tuned {number(evaluation.get("fine_tuned"))} |

![loss](loss.png)

## Use

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("THIS_REPO_OR_FOLDER")
tokenizer = AutoTokenizer.from_pretrained("THIS_REPO_OR_FOLDER")
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "..."}}], add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")
```

Prompt it through the tokenizer's chat template, which the adapter folder carries: it was trained on exactly those ids.
"""
    card = ModelCard(content)  # parses the metadata block back: a malformed card fails here, not on the Hub
    path = adapter_dir / "README.md"
    card.save(path)
    return path


def push_adapter(adapter_dir, repo_id: str, push: bool) -> str:
    """Push the adapter folder to the Hub only when asked, with a token, and online; say what happened."""
    if not push:
        return "Not pushing: push_to_hub is False. The card is written; set push_to_hub=True and hub_repo_id to share."
    if not repo_id:
        return "Not pushing: hub_repo_id is empty (e.g. 'your-name/llama2-about-me-lora')."
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        return "Not pushing: no token. Set HF_TOKEN (Colab: a secret named HF_TOKEN) with write access."
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"Not pushing: offline (HF_HUB_OFFLINE=1). The card is written in {adapter_dir}."
    api = HfApi(token=token)
    api.create_repo(repo_id, private=True, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(adapter_dir), commit_message="Upload LoRA adapter")
    return f"Pushed {adapter_dir} to https://huggingface.co/{repo_id} (private)."
