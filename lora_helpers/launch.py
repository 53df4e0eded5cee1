"""Training from a terminal, on one GPU or several: ``lora-course train`` (taught in notebook 07).

Notebook 04's recipe, the same ``LoraConfig`` and ``SFTConfig`` (``training.train_adapter``), as a command, so
that a launcher can start it once per GPU::

    torchrun --standalone --nproc_per_node 2 -m lora_helpers train --preset llama2-7b-guanaco --processes 2
    accelerate launch --multi_gpu --num_processes 2 -m lora_helpers train --preset llama2-7b-guanaco --processes 2
    accelerate launch --config_file lora_helpers/configs/accelerate/fsdp_qlora.yaml -m lora_helpers train ...

Each process holds a whole copy of the 4-bit model on its own device and trains on its own share of every batch;
DDP averages the adapters' gradients across processes after each backward pass, so every copy stays the same
(data parallelism). The effective batch is ``per_device_train_batch_size x gradient_accumulation_steps x
processes``. Only the main process (rank 0) writes ``run_dir``, in notebook 04's layout, so notebooks 05 and 06
continue from it. On CPUs (the course's rehearsal in CI) the processes talk through gloo. With an FSDP
configuration each process holds a shard of every weight instead of a copy (``sharding`` shows it on CPUs).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

from lora_helpers import adapters, files, presets, process

ACCELERATE_CONFIGS = Path(__file__).parent / "configs" / "accelerate"  # ddp.yaml, fsdp_qlora.yaml (notebook 07)


def ddp_arguments(world_size: int) -> dict:
    """What ``SFTConfig`` needs for DDP with QLoRA: every trainable weight gets a gradient at every step (LoRA
    with gradient checkpointing ``use_reentrant=False``), so DDP must not search for unused ones; on CPUs the
    processes use gloo, and ``use_cpu`` makes the trainer set up the process group at all."""
    if world_size == 1:
        return {}
    import torch

    arguments = {"ddp_find_unused_parameters": False}
    if not torch.cuda.is_available():
        arguments |= {"use_cpu": True, "ddp_backend": "gloo"}
    return arguments


def check_launch(expected: int | None, trainer_world_size: int, checkpointing_kwargs: dict | None = None) -> None:
    # checkpointing_kwargs: the trainer's gradient checkpointing arguments, None when it does not checkpoint
    """Stop before training on the launches that train wrongly without an error.

    - ``accelerate launch --cpu --num_processes 2`` starts one process: ``--processes 2`` says how many were meant.
    - torchrun starting two processes whose trainers each see a world of one: two separate trainings that write
      the same files (on a CPU without ``use_cpu=True``).
    - gradient checkpointing with ``use_reentrant=True`` under DDP: "Expected to mark a variable ready only once".
    - an FSDP configuration on CPUs, which accelerate turns into plain DDP.
    """
    import torch

    _, launched = process.world()
    if process.fsdp_launched() and not torch.cuda.is_available():
        raise RuntimeError(
            "accelerate launch with an FSDP configuration, on CPUs: accelerate would quietly train plain DDP "
            "(whole copies, nothing sharded). FSDP through the trainer needs CUDA GPUs; to watch FSDP shard a 4-bit "
            "model on CPUs, run `torchrun --standalone --nproc_per_node 2 -m lora_helpers.sharding --out fsdp.json`."
        )
    if expected is not None and launched != expected:
        raise RuntimeError(
            f"--processes {expected}, but {launched} process(es) started. `accelerate launch --cpu` starts one "
            "process whatever --num_processes says; start several with `torchrun --standalone --nproc_per_node "
            f"{expected} -m lora_helpers train ...` (CPUs and GPUs) or `accelerate launch --multi_gpu "
            f"--num_processes {expected} ...` (GPUs)."
        )
    if launched != trainer_world_size:
        raise RuntimeError(
            f"{launched} processes were started, but the trainer sees {trainer_world_size}: each would train alone "
            "and they would overwrite each other's files. On CPUs the trainer needs use_cpu=True and the gloo "
            "backend (launch.ddp_arguments)."
        )
    if (
        launched > 1
        and checkpointing_kwargs is not None
        and checkpointing_kwargs.get("use_reentrant", True) is not False
    ):
        raise RuntimeError(
            "Gradient checkpointing under DDP needs use_reentrant=False (training.checkpointing sets it): the "
            "reentrant version fails with 'Expected to mark a variable ready only once'."
        )


def train(
    preset: str,
    run_dir: str | Path | None = None,
    params: dict | None = None,
    overwrite: bool = False,
    processes: int | None = None,
    rehearse_t4: bool = False,
) -> dict:
    """Notebook 04's training as a command; returns (and on rank 0 writes) ``training_log.json``'s content.

    ``rehearse_t4``: each process behaves like a Colab T4 on its own GPU (``device.rehearse_t4``).
    """
    import datasets
    import transformers

    from lora_helpers import device, plots, training

    datasets.disable_progress_bars()  # N processes drawing bars on one terminal: rank 0 prints lines instead
    transformers.utils.logging.disable_progress_bar()
    params = dict(params or {})
    resume = bool(params.pop("resume", False))
    unknown = set(params) - set(presets.SETTING_NAMES)
    if unknown:
        raise ValueError(f"No setting named {sorted(unknown)}. Settings: {', '.join(presets.SETTING_NAMES)}.")
    settings = presets.resolve_settings(preset, **params)
    run_dir = Path(run_dir or f"runs/{preset}").expanduser().resolve()
    rank, world_size = process.world()
    check_launch(processes, world_size)  # the launcher's count, before any model is loaded
    process.use_own_gpu()  # before the T4 rehearsal caps it, and before the model is loaded onto it
    if rehearse_t4:
        message = device.rehearse_t4()
        if rank == 0:
            print(message, flush=True)
    lock = None
    if rank == 0:
        files.refuse_to_overwrite(run_dir, overwrite)  # resume continues a run that has no adapter yet
        lock = files.lock_run_dir(run_dir, f"lora-course train ({world_size} process(es))")
    run_config = {**dataclasses.asdict(settings), "trainer_route": "sft", "processes": world_size}
    try:
        trainer = training.train_adapter(
            settings,
            str(run_dir / "adapter"),
            resume=resume,
            overwrite=overwrite,
            checkpoint_dir=str(run_dir / "checkpoints"),
            saved_with=run_config,
            callbacks=[launch_check(processes)],
            extra_args={**ddp_arguments(world_size), "disable_tqdm": True},
            progress=training.progress_lines(),
        )
        log = training.training_log(trainer, "sft", trainer.prepared.lengths)  # notebook 04's, every process
        if trainer.is_world_process_zero():
            files.write_json(run_dir / "run_config.json", run_config)  # after the adapter, as notebook 04 does
            files.write_json(run_dir / "split.json", trainer.prepared.split)
            removed = adapters.remove_made_from_previous(run_dir)  # as notebook 04 does
            if removed:
                print("removed what the previous adapter made:", ", ".join(removed), flush=True)
            files.write_json(run_dir / "training_log.json", log)
            plots.plot_loss(log["log_history"], run_dir / "loss.png")
        return log
    finally:
        if lock is not None:
            lock.release()


def launch_check(processes: int | None):
    """A trainer callback running ``check_launch`` once the trainer knows its world, before the first step."""
    from transformers import TrainerCallback

    class LaunchCheck(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            in_use = args.activation_checkpointing
            kwargs_in_use = (args.activation_checkpointing_kwargs or {}) if in_use else None
            check_launch(processes, args.world_size, kwargs_in_use)

    return LaunchCheck()


def run(command: list[str]) -> None:
    """Run a launcher (torchrun, accelerate launch) from a notebook cell, printing its output as it comes.

    The processes it starts are new ones: nothing this kernel did (a GPU already in use, bitsandbytes imported)
    reaches them, which ``accelerate.notebook_launcher`` requires of the kernel it forks. A failure raises with
    the last lines of output; interrupting the cell stops the processes.
    """
    print("$", shlex.join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # torchrun's default, unwarned
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    last = collections.deque(maxlen=30)
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            last.append(line)
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise
    if process.wait() != 0:
        raise RuntimeError(f"{command[0]} ... exited with {process.returncode}. Its last lines:\n" + "".join(last))
