"""A training script run with test hooks: `python hooked_run.py SCRIPT ARGS...` runs SCRIPT's main(ARGS)
(train_vits or train_feedback), alone or as one torchrun process, with two hooks set by environment:

- TEST_DUMP_DIR: when fit() returns, this process saves the voice it holds (as export_voice saves it)
  and its discriminator to TEST_DUMP_DIR/rank<N>.pt;
- TEST_SIGNAL_AFTER_STEP=N: right after training step N the process of rank TEST_SIGNAL_RANK (default 0)
  signals itself TEST_SIGNAL (default SIGTERM), so kills land at a known step, whatever the machine's speed.
"""

import os
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from voicetune.common import distributed  # noqa: E402
from voicetune.night import loop  # noqa: E402
from voicetune.voice import models  # noqa: E402
import train_feedback  # noqa: E402
import train_vits  # noqa: E402
from voicetune.night import vits_trainer  # noqa: E402

run_fit, run_window = loop.fit, vits_trainer.VitsTrainer.train_window
in_fit = False


def fit(trainer, *args, **kwargs):
    global in_fit
    in_fit = True  # the planner's benchmark steps run before fit and do not count
    reason = run_fit(trainer, *args, **kwargs)
    dump_dir = os.environ.get("TEST_DUMP_DIR")
    if dump_dir:
        state = dict(model=models.inference_copy(trainer.model).state_dict(), disc=trainer.disc.state_dict(),
                     reason=reason, step=trainer.step)
        torch.save(state, os.path.join(dump_dir, f"rank{distributed.rank()}.pt"))
    return reason


def train_window(trainer, *args, **kwargs):
    result = run_window(trainer, *args, **kwargs)
    after = os.environ.get("TEST_SIGNAL_AFTER_STEP")
    if in_fit and after and distributed.rank() == int(os.environ.get("TEST_SIGNAL_RANK", "0")) and trainer.step == int(after):
        signal.raise_signal(getattr(signal, os.environ.get("TEST_SIGNAL", "SIGTERM")))
    return result


loop.fit, vits_trainer.VitsTrainer.train_window = fit, train_window
script = {"train_vits": train_vits, "train_feedback": train_feedback}[sys.argv[1]]
sys.exit(script.main(sys.argv[2:]))
