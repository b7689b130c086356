"""One process of a torchrun job for tests/test_distributed.py: `python ddp_worker.py SCRIPT ARGS...`
runs SCRIPT's main(ARGS) (train_vits or train_feedback) with two test hooks:

- DDP_TEST_DUMP_DIR: when fit() returns, this rank saves the voice it holds (as export_voice saves it)
  and its discriminator to DDP_TEST_DUMP_DIR/rank<N>.pt;
- DDP_TEST_STOP_AFTER_STEP=N: rank 1 alone signals itself SIGTERM right after training step N.
"""

import os
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_feedback  # noqa: E402
import train_vits as tv  # noqa: E402

run_fit, run_window = tv.fit, tv.VitsTrainer.train_window
in_fit = False


def fit(trainer, *args, **kwargs):
    global in_fit
    in_fit = True  # the planner's benchmark steps run before fit and do not count
    reason = run_fit(trainer, *args, **kwargs)
    dump_dir = os.environ.get("DDP_TEST_DUMP_DIR")
    if dump_dir:
        state = dict(model=tv.inference_copy(trainer.model).state_dict(), disc=trainer.disc.state_dict(),
                     reason=reason, step=trainer.step)
        torch.save(state, os.path.join(dump_dir, f"rank{tv.rank()}.pt"))
    return reason


def train_window(trainer, *args, **kwargs):
    result = run_window(trainer, *args, **kwargs)
    stop_after = os.environ.get("DDP_TEST_STOP_AFTER_STEP")
    if in_fit and stop_after and tv.rank() == 1 and trainer.step == int(stop_after):
        signal.raise_signal(signal.SIGTERM)
    return result


tv.fit, tv.VitsTrainer.train_window = fit, train_window
script = {"train_vits": tv, "train_feedback": train_feedback}[sys.argv[1]]
sys.exit(script.main(sys.argv[2:]))
