"""`lora-course train` under torchrun with two CPU processes (gloo): data-parallel QLoRA of the tiny model, the
traps that train wrongly without an error, and a multi-process run that notebooks 05 and 06 continue from."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_helpers import course, launch

pytestmark = pytest.mark.course
EPOCHS = "num_train_epochs=10"


def train(run_dir, *extra, processes: int = 1):
    """`lora-course train` on the tiny preset, under torchrun when ``processes`` > 1."""
    command = [sys.executable, "-m", "lora_helpers", "train", "--preset", "tiny", "--run-dir", str(run_dir), *extra]
    if processes > 1:  # torchrun, as `python -m torch.distributed.run`
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "training_log.json").read_text())


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return run_dir, train(run_dir, "--processes", "2", "-p", EPOCHS, processes=2)


def test_two_processes_train_one_model(ddp):
    run_dir, log = ddp
    assert log["world_size"] == 2 and log["effective_batch"] == 8 * 1 * 2
    assert len(log["replica_checksums"]) == 2 and len(set(log["replica_checksums"])) == 1  # identical copies
    assert log["final_train_loss"] < 0.6 * log["first_train_loss"]
    assert json.loads((run_dir / "run_config.json").read_text())["processes"] == 2
    assert not (run_dir / ".lock").exists()


def test_ddp_ends_near_one_process_with_the_same_effective_batch(ddp, tmp_path):
    """Same seed, same effective batch (2 x 8 against 1 x 16): the same training up to data order (each process
    draws its own length-grouped batches) and how the loss is averaged. Measured: 0.16 relative to the adapter's
    size, against 1.40 for a change of seed."""
    run_dir, _ = ddp
    train(tmp_path / "single", "-p", EPOCHS, "-p", "per_device_train_batch_size=16")
    train(tmp_path / "other-seed", "-p", EPOCHS, "-p", "per_device_train_batch_size=16", "-p", "seed=1")

    def adapter(directory):
        weights = load_file(directory / "adapter" / "adapter_model.safetensors")
        return torch.cat([weights[k].flatten() for k in sorted(weights)])

    single = adapter(tmp_path / "single")
    distance = ((adapter(run_dir) - single).norm() / single.norm()).item()
    seed_change = ((adapter(tmp_path / "other-seed") - single).norm() / single.norm()).item()
    assert distance < 0.3 and distance < 0.25 * seed_change, (distance, seed_change)


def test_notebooks_05_and_06_continue_from_a_multi_process_run(ddp):
    run_dir, _ = ddp
    summary = course.run_course("tiny", run_dir, only=["05", "06"], params={"run_lm_eval": False})
    assert summary["status"] == "ok"
    assert (run_dir / "merged" / "config.json").exists() and summary["exact_match"]["fine_tuned"] is not None


def test_one_process_where_two_were_asked_for_is_refused(tmp_path):
    """What `accelerate launch --cpu --num_processes 2` does: it starts one process."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_helpers",
            "train",
            "--preset",
            "tiny",
            "--run-dir",
            str(tmp_path / "run"),
            "--processes",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "--processes 2, but 1 process(es) started" in result.stderr and "torchrun" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_silent_traps_are_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="2 processes were started, but the trainer sees 1: each would train alone"):
        launch.check_launch(None, 1)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        launch.check_launch(2, 2, {"use_reentrant": True})
    launch.check_launch(2, 2, {"use_reentrant": False})
    launch.check_launch(2, 2, None)  # no gradient checkpointing
    assert launch.ddp_arguments(2) == {"ddp_find_unused_parameters": False, "use_cpu": True, "ddp_backend": "gloo"}
    assert launch.ddp_arguments(1) == {}


def test_two_machines_meet_by_rendezvous(tmp_path):
    """The several-machines command (torchrun's c10d rendezvous, as the SLURM script runs it), rehearsed with two
    'machines' of one process each on this one: one training of world size 2, written once."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    command += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:29541", "--rdzv_id", "two-machines"]
    command += ["-m", "lora_helpers", "train", "--preset", "tiny", "--run-dir", str(run_dir), "--processes", "2"]
    command += ["-p", "num_train_epochs=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)]
    machines.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], outputs
    log = json.loads((run_dir / "training_log.json").read_text())
    assert log["world_size"] == 2 and log["strategy"] == "ddp" and len(set(log["replica_checksums"])) == 1
    assert sum("trained on 2 process(es)" in output for output in outputs) == 1  # rank 0 alone reports and writes


def test_the_slurm_script_runs_torchrun_with_a_rendezvous():
    script = launch.ACCELERATE_CONFIGS.parent / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for part in ("#SBATCH --nodes=2", "srun torchrun", "--rdzv_backend c10d", '--rdzv_endpoint "$HEAD_NODE:29500"'):
        assert part in text, part
    assert "--processes $((SLURM_NNODES * GPUS_PER_NODE))" in text  # the count check spans the machines


def accelerate_launch_environment(config_file) -> tuple[dict, object]:
    """What `accelerate launch --config_file F` puts in each process's environment, and its parsed arguments."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    arguments = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "lora_helpers", "train"])
    arguments, _, _ = _validate_launch_command(arguments)
    return prepare_multi_gpu_env(arguments), arguments


def test_the_shipped_fsdp_config_gives_fsdp2_qlora_settings(monkeypatch):
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    env, arguments = accelerate_launch_environment(launch.ACCELERATE_CONFIGS / "fsdp_qlora.yaml")
    assert arguments.use_fsdp and arguments.num_processes == 2
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy  # one unit per decoder layer
    assert plugin.cpu_ram_efficient_loading is True and plugin.activation_checkpointing is False
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.cpu_offload.__class__.__name__ == "OffloadPolicy"
    from lora_helpers import models, process

    assert process.fsdp_launched() and models.fsdp_storage_dtype() == torch.float32  # fp32 on a CPU and on a T4
    with pytest.raises(RuntimeError, match="accelerate would quietly train plain DDP"):
        launch.check_launch(None, 1)  # FSDP on CPUs, named before any model loads


def test_the_shipped_ddp_config_starts_one_process_per_gpu():
    env, arguments = accelerate_launch_environment(launch.ACCELERATE_CONFIGS / "ddp.yaml")
    assert arguments.multi_gpu and arguments.num_processes == 2 and not arguments.use_fsdp
    assert (
        "ACCELERATE_USE_FSDP" not in env and env["ACCELERATE_MIXED_PRECISION"] == "no"
    )  # the trainer chooses fp16/bf16
