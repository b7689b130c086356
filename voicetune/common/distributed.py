"""Devices and several processes: `torchrun --nproc_per_node N` runs N copies of a trainer, one per GPU,
joined by torch.distributed. A plain `python train_vits.py` starts no process group and every helper
below is a no-op for it."""

import contextlib
import datetime
import math
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from voicetune.common import run_errors


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def is_main_process():
    """Rank 0 alone writes checkpoints, models, samples, metrics and prints."""
    return rank() == 0


def launched_processes():
    """Processes torchrun started (its WORLD_SIZE), known before the process group exists; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sync(device):
    """Wait for the work queued on `device` (a GPU runs asynchronously: a clock read needs it done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise run_errors.TrainingError(f"--device {name}: no CUDA GPU is visible to torch (use --device cpu)")
    if name == "cuda" and launched_processes() > 1:
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # torchrun: one GPU per process on each node
    return torch.device(name)


def init_distributed(device):
    """Join torchrun's process group when it started more than one process; a plain run starts none."""
    if launched_processes() <= 1 or is_distributed():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Rank 0 may work alone for minutes (first preload, validation, saving) while the others wait.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    # Every rank starts from the same weights (DDP copies rank 0's) but draws its own random slices.
    torch.manual_seed(torch.initial_seed() + rank())
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints; every rank's errors still reach stderr


def leave_distributed():
    if is_distributed():
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce(value, op):
    """A number combined over all ranks (op "min", "max" or "sum"); the number itself without torchrun."""
    if not is_distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
    return t.item()


def any_rank(flag):
    """True on every rank when `flag` is true on any: all ranks then take the same branch (stop, skip)."""
    return bool(all_reduce(bool(flag), "max"))


def all_ranks(flag):
    return not any_rank(not flag)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a folder name it chose, a report it wrote)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (decoding, writing a cache); the others run it after, reading what it wrote."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def shard_batches(make_batches):
    """make_batches for this rank: every world_size-th batch of the epoch, starting at its rank.

    The epoch's list is the same on every rank (seeded by epoch), so together the ranks train exactly
    its batches; it is first padded by repeating its first batches to a multiple of world_size, so every
    rank takes the same number of optimizer steps. Global step k covers the batches a single process
    would take in k's window of grad_accum x world_size batches.
    """
    n, r = world_size(), rank()
    if n == 1:
        return make_batches

    def make(epoch):
        batches = make_batches(epoch)
        padded = [batches[i % len(batches)] for i in range(math.ceil(len(batches) / n) * n)]
        return padded[r::n]
    return make


def data_parallel(module, device):
    """`module` under DistributedDataParallel when torchrun started several processes, else unchanged.

    DDP averages gradients across ranks during backward, but only of what ran through its forward.
    """
    if not is_distributed():
        return module
    # The relative-position embeddings of VitsModel's attention get gradients of slices with other
    # strides than DDP's buckets: DDP copies these few values and warns that it does.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
