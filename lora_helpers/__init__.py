"""Plumbing for the LoRA / QLoRA course. Each module names the notebook that teaches its idea.

Import modules explicitly (``from lora_helpers import data``); nothing is re-exported here. The modules stand in
floors: each imports only modules on the floors below its own (imports inside functions included; checked by
tests/test_package.py), so any module can be read knowing only what is beneath it.

    floor 0: chat, device, files, lora, plots, process, shipped_configs
    floor 1: data, evaluate, hub, presets, runtimes, smollm2, widgets
    floor 2: distill, gguf_export, retention, tiny
    floor 3: harness, models
    floor 4: adapters, merge, plan, serving, training
    floor 5: bench, course, experiments, launch, sharding
    floor 6: links, sweep

Floor 0 holds facts and formats (chat templates, the machine, files, LoRA counts, plots of given numbers, this
process's rank, the shipped configs); floor 1 the presets, the data and the measures; then the models the course builds,
loading one (``models``), what is done with a loaded model, the commands, and the notebooks' links.
"""

import logging
import os
import warnings

__version__ = "0.1.0"

# Notices from inside the libraries that a learner can do nothing about, kept out of the executed notebooks:
# - peft 0.21's prepare_model_for_kbit_training asks transformers 5.24 for `is_gradient_checkpointing` and calls
#   `gradient_checkpointing_enable`, names transformers now deprecates for `..._activation_checkpointing...`;
# - bitsandbytes on a CPU with AVX512-BF16 tries to download a faster 4-bit kernel from the Hub (the `kernels`
#   package), and logs when it cannot; its built-in kernel is used instead, and the course turns its repacking off
#   anyway (models.keep_4bit_weights_as_loaded);
# - transformers sorts checkpoints by modification time and says so when two are under a second apart (the tiny
#   preset saves that fast); it then sorts them by step number, which is right;
# - transformers says which dtype `dequantize()` produced, on every call (notebook 05 prints the merge's dtype);
# - transformers ignores Llama-3's `clean_up_tokenization_spaces=True` (it would corrupt byte-level text) and says
#   so on every tokenizer load;
# - transformers' pipeline suggests a dataset when it is called once per prompt on a GPU (notebook 06 does, to
#   print each answer as the learner reads it);
# - gguf's SpecialVocab does not recognise Llama's two-sequence template (`<s> A <s> B`), which llama.cpp never uses.
# Import lora_helpers before peft and bitsandbytes for the second to take effect (the notebooks do).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"`gradient_checkpointing_enable` is deprecated", category=FutureWarning)
# trl 1.16 deprecates use_liger_kernel for kernels from the Hub; notebook 04 says so where it teaches Liger
warnings.filterwarnings("ignore", message=r"`use_liger_kernel=True` is deprecated", category=FutureWarning)
# peft suggests low_cpu_mem_usage=True for EVA (a larger batch in its data pass); notebook 08's EVA point uses the
# training batches as they are
warnings.filterwarnings("ignore", message=r"lora with eva initialization used with low_cpu_mem_usage=False")


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))
logging.getLogger("transformers.trainer_utils").addFilter(_DropMessage("mtime may not be reliable"))
logging.getLogger("transformers.integrations.bitsandbytes").addFilter(_DropMessage("The modules are dequantized in"))
logging.getLogger("transformers.tokenization_utils_tokenizers").addFilter(
    _DropMessage("Ignoring clean_up_tokenization_spaces=True for BPE")
)
logging.getLogger("transformers.pipelines.base").addFilter(_DropMessage("You seem to be using the pipelines"))
logging.getLogger("gguf.vocab").addFilter(_DropMessage("Unknown separator token"))

# The course runner asks each notebook's kernel for its peak memory at exit (device.record_peaks, summary.json).
from lora_helpers import device as _device  # noqa: E402 (after the filters; it imports nothing heavy)

if os.environ.get(_device.PEAKS_ENV):
    _device.start_recording_peaks(os.environ[_device.PEAKS_ENV])
