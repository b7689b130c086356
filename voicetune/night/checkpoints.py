"""Checkpoints and resume: the checkpoint schema written next to its reader, RNG state,
which checkpoint --resume means, the checks that a resumed run is the same run, and pruning."""

import dataclasses
import glob
import hashlib
import os
import pickle
import random
import zlib

import numpy as np
import torch

from voicetune.common import distributed
from voicetune.common import run_errors
from voicetune.voice import models


def rng_state():
    """Every RNG's state as tensors and plain Python values, so checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                            cached_gaussian=float(cached_gaussian)))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path, mmap=False):
    """A checkpoint of this script, loaded with weights_only=True: tensors and plain values, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise run_errors.TrainingError(f"{path}: refused, it holds pickled Python objects, not only tensors and plain "
                                       "values (a checkpoint of an older version, or one that could run code)") from err
    except Exception as err:
        raise run_errors.TrainingError(f"{path}: cannot read the checkpoint ({str(err).splitlines()[0]})") from err


def checkpoint_progress(path):
    """(step, epoch, batches done) a checkpoint records: how far its run had got, whatever the file dates."""
    state = read_checkpoint(path, mmap=True)  # mmap: only these few values are read from disk
    try:
        return int(state["trainer"]["step"]), int(state["epoch"]), int(state["batches_done"])
    except (KeyError, TypeError, ValueError, IndexError) as err:
        # A stray file under a checkpoint's name (a state dict saved by hand, another tool's file).
        raise run_errors.TrainingError(f"{path}: not a checkpoint of this script (it records no step, epoch "
                                       "and batches done)") from err


def run_checkpoints(output_dir, skip_unreadable=False):
    """The run's epoch checkpoints, oldest first by the progress they record (an unreadable one raises)."""
    progress = {}
    for path in glob.glob(os.path.join(output_dir, "checkpoints", "checkpoint_epoch_*.pt")):
        try:
            progress[path] = checkpoint_progress(path)
        except run_errors.TrainingError:
            if not skip_unreadable:
                raise
    return sorted(progress, key=progress.get)


def newest_checkpoint(output_dir):
    paths = run_checkpoints(output_dir)
    return paths[-1] if paths else None


def prune_checkpoints(output_dir, keep):
    # A file that is not a readable checkpoint is not ours to judge: it is left alone.
    for path in run_checkpoints(output_dir, skip_unreadable=True)[:-keep]:
        os.remove(path)


def save_checkpoint(output_dir, tag, trainer, run, epoch, batches_done, budget_used, args, data_key):
    """checkpoints/checkpoint_epoch_<epoch><tag>.pt: all that load_checkpoint needs to go on exactly where the
    run was (rank 0 writes it, with every rank's RNG state: each draws its own slices); then the oldest
    epoch checkpoints beyond --keep_checkpoints are removed."""
    rank_rngs = distributed.gather_objects(rng_state())
    if not distributed.is_main_process():
        return
    state = dict(trainer=trainer.state_dict(), epoch=epoch, batches_done=batches_done,
                 plan=dataclasses.asdict(run.plan), budget_used=budget_used, best=run.best,
                 d_warmup_steps=run.d_warmup_steps, rng=rank_rngs[0],
                 args=vars(args), data_key=data_key, model_config=trainer.model.config.to_dict(),
                 world_size=distributed.world_size())
    if distributed.world_size() > 1:
        state["rank_rngs"] = rank_rngs
    models.atomic_torch_save(state, os.path.join(output_dir, "checkpoints", f"checkpoint_epoch_{epoch}{tag}.pt"))
    prune_checkpoints(output_dir, args.keep_checkpoints)


def load_checkpoint(path, state, trainer, args, data_key, fixed_flags=None):
    """Restore the run of checkpoint `state` (read from `path`) exactly; a checkpoint of another model, data
    set or number of processes, or with other `fixed_flags`, fails loudly."""
    check_resumed_flags(state.get("args", {}), args, path, fixed_flags or RESUME_FIXED)
    if state.get("data_key") != data_key:
        raise run_errors.TrainingError(f"--resume {path}: the checkpoint was trained on other data "
                                       "(metadata.csv, speakers.csv or the validation split changed); start a new --output_dir")
    saved_world = state.get("world_size", 1)
    if saved_world != distributed.world_size():
        # Each rank's place in the epoch and its random state belong to the number of processes.
        raise run_errors.TrainingError(
            f"--resume {path}: the run was trained by {saved_world} process(es), this one has "
            f"{distributed.world_size()}; resume it with torchrun --nproc_per_node {saved_world}"
            + (" (or plain python)" if saved_world == 1 else ""))
    try:
        trainer.schedule(state["plan"]["total_steps"], state["d_warmup_steps"],
                         state["plan"].get("decay_from") or (None, None))
        trainer.load_state_dict(state["trainer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise run_errors.TrainingError(f"--resume {path}: the checkpoint does not match --model "
                                       f"({str(err).splitlines()[0]})") from err
    set_rng_state(state["rank_rngs"][distributed.rank()] if distributed.world_size() > 1 else state["rng"])


# Flags that shape the LR schedule or which clips make up each batch: a resumed run must keep them
# (train_feedback.py adds its own).
RESUME_FIXED = ("lr", "d_lr", "batch_size", "grad_accum", "seed", "speakers", "speaker_lr")


def check_resumed_flags(saved, args, path, fixed=RESUME_FIXED):
    changed = [f"--{name} {getattr(args, name)} (the run has {saved[name]})" for name in fixed
               if name in saved and hasattr(args, name) and saved[name] != getattr(args, name)]
    if changed:
        raise run_errors.TrainingError(
            f"--resume {path}: {', '.join(changed)}; a resumed run keeps its LR schedule and the clips of every "
            "batch: give the run's values, or start over with --overwrite")


def data_fingerprint(train_sets, val_sets):
    """What the run trains on: names, texts and audio (a WAV replaced under the same name changes it), and
    each clip's speaker id in a multi-speaker voice."""
    h = hashlib.sha256()
    for cs in list(train_sets) + list(val_sets.values()):
        for name, text, pcm in zip(cs.names, cs.texts, cs.audio):
            h.update(f"{name}|{text}|{len(pcm)}|{zlib.crc32(np.ascontiguousarray(pcm))}\n".encode())
        if cs.speaker_ids is not None:
            h.update(f"speakers {cs.speaker_ids}".encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def resume_state(args):
    """(path, state) of the checkpoint --resume names (auto: the newest in --output_dir), read once; (None,
    None) for a fresh run. Read whole, not memory-mapped: on Windows a mapped file cannot be pruned later."""
    if not args.resume:
        return None, None
    path = args.resume
    if path == "auto":
        path = newest_checkpoint(args.output_dir)
        if path is None:
            raise run_errors.TrainingError(
                f"--resume auto: no checkpoint in {os.path.join(args.output_dir, 'checkpoints')}")
    return path, read_checkpoint(path)
