"""train_vits.py under torchrun: 2 CPU processes with the gloo backend, tiny model (tests/hooked_run.py)."""

import json
import math
import os
import socket
import subprocess
import sys

import torch
from transformers import VitsModel

from voicetune.night import checkpoints
import train_vits
from conftest import quick, ROOT

WORKER = os.path.join(ROOT, "tests", "hooked_run.py")
# --grad_accum 1: a process's optimizer steps per epoch are its batches.
QUICK = quick(grad_accum=1, logging_steps=1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(args, env):
    """Both ranks started as torchrun starts them (its environment variables), so each one's exit code shows."""
    port = free_port()
    procs = []
    for rank in range(2):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, WORKER, "train_vits"] + args, cwd=ROOT, env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], outputs


def torchrun(args, env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           WORKER, "train_vits"] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def metric_steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [record["step"] for record in map(json.loads, f) if "lr" in record]  # training lines


def checkpoint_step(out, name):
    return checkpoints.read_checkpoint(os.path.join(out, "checkpoints", name))["trainer"]["step"]


def test_two_processes_stop_together_resume_and_end_with_rank_1s_weights(prepared_dataset, tiny_model_dir,
                                                                         tmp_path, capsys):
    out, dumps = str(tmp_path / "run"), str(tmp_path / "dumps")
    os.makedirs(dumps)
    args = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "2",
            "--benchmark_samples", "4"] + QUICK
    env = dict(os.environ, TEST_DUMP_DIR=dumps)

    # 1. SIGTERM reaches rank 1 alone after step 2: both ranks stop there; rank 0 saves.
    codes, outputs = launch_two(args, dict(env, TEST_SIGNAL_AFTER_STEP="2", TEST_SIGNAL_RANK="1"))
    assert codes == [130, 130], outputs
    with open(os.path.join(out, "run_config.json")) as f:
        single_process_steps = math.ceil(json.load(f)["train_clips"] / 2)  # batch 2, one batch per step
    per_epoch = single_process_steps // 2
    assert f"{per_epoch} optimizer steps per epoch" in outputs[0]
    assert "epoch 1/2" not in outputs[1] and "preload:" not in outputs[1]  # only rank 0 prints
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint_epoch_1_interrupted.pt"]
    assert checkpoint_step(out, "checkpoint_epoch_1_interrupted.pt") == 2
    assert not os.path.exists(os.path.join(out, "final_model"))
    assert metric_steps(out) == [1, 2]  # one metrics line per step: only rank 0 logs
    for rank in range(2):
        assert torch.load(os.path.join(dumps, f"rank{rank}.pt"), weights_only=True)["reason"] == "interrupted"

    # 2. torchrun --resume auto continues at step 3; each epoch takes half the single-process steps.
    result = torchrun(args + ["--resume", "auto"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed" in result.stdout and "step 2," in result.stdout
    assert metric_steps(out) == list(range(1, 2 * per_epoch + 1))
    assert checkpoint_step(out, "checkpoint_epoch_1.pt") == per_epoch
    assert checkpoint_step(out, "checkpoint_epoch_2.pt") == 2 * per_epoch
    final = VitsModel.from_pretrained(os.path.join(out, "final_model")).state_dict()
    disc = torch.load(os.path.join(out, "final_model", "discriminator.pt"), weights_only=True)
    rank1 = torch.load(os.path.join(dumps, "rank1.pt"), weights_only=True)
    assert rank1["step"] == 2 * per_epoch
    assert final.keys() == rank1["model"].keys()
    for key, value in final.items():
        assert torch.equal(value, rank1["model"][key]), key
    for key, value in disc.items():
        assert torch.equal(value, rank1["disc"][key]), key

    # 3. One process cannot continue it: each rank's place in the epoch depends on the count.
    capsys.readouterr()
    assert train_vits.main(args + ["--resume", "auto", "--epochs", "3"]) == 2
    assert "trained by 2 process(es), this one has 1; resume it with torchrun --nproc_per_node 2" in \
        capsys.readouterr().err
