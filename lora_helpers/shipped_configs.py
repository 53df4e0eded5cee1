"""Real models' ``config.json`` files, shipped with the course in ``configs/`` so that it works offline.

The planner reads them (notebooks 02, 03 and 07: "will it fit?"), and ``tiny`` builds its twins and the
random-weight models of real 7B/8B shapes from them (notebook 01's presets, ``lora-course bench``).
"""

from __future__ import annotations

import json
from pathlib import Path

DIR = Path(__file__).parent / "configs"
# The shipped config (configs/NAME.json) of each model id that has one.
BY_MODEL_ID = {
    "NousResearch/Llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b",
    "meta-llama/Llama-3.2-3B": "llama-3.2-3b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B": "llama-3.1-8b",
    # Not presets: for "will it fit on several GPUs?" (notebook 07 and `plan -p num_gpus=2`)
    "NousResearch/Llama-2-13b-chat-hf": "llama-2-13b",
    "meta-llama/Llama-2-13b-chat-hf": "llama-2-13b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b",
}


def values(name: str) -> dict:
    """``configs/NAME.json`` as a dict: a real model's config, shipped with the course."""
    return json.loads((DIR / f"{name}.json").read_text())
