"""Run a script as if the GPU had only N GiB: an 8 GB card (the user's RTX 2070) simulated on a bigger one.

    python benchmarks/with_gpu_memory.py 8 train_vits.py --batch_size auto --max_steps 50 --precision fp16

torch.cuda.set_per_process_memory_fraction caps what PyTorch's allocator may take (an allocation past it
raises torch.OutOfMemoryError, as the small card would) and train_vits.py's `--batch_size auto` sizes its
headroom from that cap. The CUDA context and cuDNN workspaces outside the allocator are not capped, so a real
8 GB card has a few hundred MB less than this simulates.
"""

import atexit
import os
import runpy
import sys

import torch


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    gib, script = float(sys.argv[1]), sys.argv[2]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), 0)
    print(f"with_gpu_memory: {torch.cuda.get_device_name(0)} capped at {gib:g} GiB of {total / 2**30:.1f} GiB",
          flush=True)
    atexit.register(lambda: print(f"with_gpu_memory: peak allocated {torch.cuda.max_memory_allocated(0) / 2**30:.2f} GiB "
                                  f"(the last trial or step; reserved {torch.cuda.max_memory_reserved(0) / 2**30:.2f} GiB)"))
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
