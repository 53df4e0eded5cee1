"""Plumbing for the LoRA / QLoRA course. Each module names the notebook that teaches its idea.

Import modules explicitly (``from lora_helpers import data``); nothing is re-exported here.
"""

__version__ = "0.1.0"
