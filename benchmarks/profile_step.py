"""Where a training step's time goes: MAS, spectrograms, batch assembly, each network, backward.

    python benchmarks/profile_step.py --model_size tiny --device cpu
    python benchmarks/profile_step.py --model_size full --device cpu --steps 2
    python benchmarks/profile_step.py --only mas        # monotonic alignment search alone

1. MAS: the packaged Cython `maximum_path` (what training uses on a CPU; on a GPU alignment.py's device DP
   takes its place) against its pure-NumPy version, at realistic sizes (batch 8, 100-200 token ids with
   blanks, 300-600 frames), plus the log-likelihood matrix that feeds it (`monotonic_alignment` less the
   kernel; on a GPU, where the kernel does not run, that column is the whole device alignment).
2. Data: `collate` of preloaded clips, the naive path's per-step disk read + CPU log-mel for the same
   clips, and the linear spectrogram every step computes on the device.
3. One training step (`VitsTrainer.train_window`) on real collated batches, split by section: every
   forward is timed by a wrapper (on CUDA after a synchronize), and what is left is backward, losses and
   the optimizers. Also counts the operators a step launches (each one a kernel launch on a GPU).
"""

import argparse
import functools
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from monotonic_alignment_search import maximum_path_cython, maximum_path_numpy  # noqa: E402

from voicetune.common import distributed  # noqa: E402
from voicetune.night import alignment  # noqa: E402
from voicetune.night import clip_data  # noqa: E402
from voicetune.night import objective  # noqa: E402
from voicetune.night import training_flags  # noqa: E402
from voicetune.night import vits_trainer  # noqa: E402
from voicetune.voice import models  # noqa: E402
from voicetune.voice import spectrogram  # noqa: E402
from benchmarks import common  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_size", default="tiny", choices=["tiny", "full"], help="As bench_train.py.")
    p.add_argument("--disc_channels", type=int, default=None, choices=[64, 128, 256, 512, 1024],
                   help="Default: 64 for tiny, 1024 for full.")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto.")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="Profiled steps (after one warm-up step).")
    p.add_argument("--clips", type=int, default=200, help="Generated clips to draw batches from.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU).")
    p.add_argument("--only", choices=["mas", "data", "step"], default=None, help="Run one part only.")
    return p


def timeit(fn, repeat, sync=lambda: None):
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat * 1000


def profile_mas(device):
    print("\n## MAS (batch 8, every item full length; ms per call)\n")
    print("| token ids | frames | log-likelihood (4 matmuls, 192 ch) | Cython maximum_path | NumPy maximum_path |")
    print("|---:|---:|---:|---:|---:|")
    sync = functools.partial(distributed.sync, device)
    for tokens, frames in ((100, 300), (150, 450), (200, 600)):
        g = torch.Generator().manual_seed(0)
        z_p, m_p = torch.randn(8, 192, frames, generator=g), torch.randn(8, 192, tokens, generator=g)
        logs_p = 0.1 * torch.randn(8, 192, tokens, generator=g)
        z_p, m_p, logs_p = z_p.to(device), m_p.to(device), logs_p.to(device)
        x_mask, y_mask = torch.ones(8, 1, tokens, device=device), torch.ones(8, 1, frames, device=device)
        total = timeit(lambda: objective.monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask), 5, sync)
        value = torch.randn(8, tokens, frames, generator=g)
        mask = torch.ones(8, tokens, frames)
        cy = timeit(lambda: maximum_path_cython(value, mask), 10)
        nu = timeit(lambda: maximum_path_numpy(value, mask), 3)
        # On a GPU monotonic_alignment runs the device DP, not the kernel: nothing of its time to take away.
        print(f"| {tokens} | {frames} | {total - cy if device.type == 'cpu' else total:.1f} | {cy:.1f} | {nu:.1f} |")


def make_batches(clipset, batch_size, n, segment_frames):
    lengths = [clipset.frames(i) for i in range(len(clipset))]
    order = sorted(range(len(clipset)), key=lambda i: -lengths[i])  # the longest batches: the worst case
    return [[(clipset, i) for i in order[k * batch_size:(k + 1) * batch_size]] for k in range(n)]


def profile_data(clipset, data_dir, device, batch_size):
    print(f"\n## Data for one batch of {batch_size} of the longest clips (ms)\n")
    items = make_batches(clipset, batch_size, 1, 32)[0]
    wavs = os.path.join(data_dir, "wavs")

    def naive():
        for cs, i in items:
            audio, _ = sf.read(os.path.join(wavs, cs.names[i]), dtype="float32")
            spectrogram.mel_spectrogram(torch.from_numpy(audio)[None], 16000)

    batch = clip_data.collate(items, 32)
    audio_dev = batch["audio"].to(device)
    sync = functools.partial(distributed.sync, device)
    rows = [("collate (preloaded int16 + fp16 -> padded fp32 tensors)", timeit(lambda: clip_data.collate(items, 32), 20)),
            ("naive: soundfile read + CPU log-mel of the same clips", timeit(naive, 5)),
            (f"linear spectrogram of the batch on {device.type} (every step, both loops)",
             timeit(lambda: spectrogram.linear_spectrogram(audio_dev), 10, sync))]
    if device.type == "cuda":
        rows.append(("to_device (pin + non_blocking copy)", timeit(lambda: clip_data.to_device(batch, device), 20, sync)))
        rows.append(("plain .to(device) copy", timeit(lambda: {k: v.to(device) for k, v in batch.items()}, 20, sync)))
    size = sum(v.numel() * v.element_size() for v in batch.values())
    print(f"batch tensors: {size / 2**20:.1f} MiB, {tuple(batch['audio'].shape)} audio, {tuple(batch['mel'].shape)} mel\n")
    print("| what | ms |")
    print("|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


def profile_step(trainer, batches, device):
    times = defaultdict(float)
    sync = functools.partial(distributed.sync, device)

    def wrap(owner, attr, label):
        fn = getattr(owner, attr)

        def timed(*a, **k):
            sync()
            start = time.perf_counter()
            out = fn(*a, **k)
            sync()
            times[label] += time.perf_counter() - start
            return out
        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, fn)

    model = trainer.model
    undo = [wrap(model.text_encoder, "forward", "text encoder"),
            wrap(model.posterior_encoder, "forward", "posterior encoder"),
            wrap(model.flow, "forward", "flow"),
            wrap(alignment, "maximum_path", "MAS: Cython maximum_path (incl. copies)"),
            wrap(alignment, "device_maximum_path", "MAS: device_maximum_path"),
            wrap(objective, "monotonic_alignment", "MAS: log-likelihood matrix"),
            wrap(model.duration_predictor, "forward", "stochastic duration predictor"),
            wrap(model.decoder, "forward", "HiFi-GAN decoder (32-frame slices)"),
            wrap(trainer.disc, "forward", "discriminator (3 calls)"),
            wrap(spectrogram, "linear_spectrogram", "spectrograms (linear; mel of the slices)"),
            wrap(trainer, "update", "gradient clipping + optimizer steps")]
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # warm-up, counting operators (not timed)
        trainer.train_window([batches[0]])
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    times.clear()
    total = 0.0
    for batch in batches[1:]:
        sync()
        start = time.perf_counter()
        trainer.train_window([batch])
        sync()
        total += time.perf_counter() - start
    for u in undo:
        u()
    n = len(batches) - 1
    # monotonic_alignment's time holds maximum_path's; report the matrix alone.
    times["MAS: log-likelihood matrix"] -= times["MAS: Cython maximum_path (incl. copies)"]
    times["backward, losses, the rest"] = total - sum(times.values())
    print("| section | ms/step | share |")
    print("|---|---:|---:|")
    for name, sec in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {1000 * sec / n:.0f} | {100 * sec / total:.1f}% |")
    print(f"| **total** | **{1000 * total / n:.0f}** | (a step runs {ops} aten operators) |")


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = distributed.resolve_device(args.device)
    precision, _ = vits_trainer.resolve_precision(args.precision, device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    disc_channels = args.disc_channels or (64 if args.model_size == "tiny" else 1024)
    load = os.getloadavg()[0]
    print(f"profile_step: device {device} ({os.cpu_count()}-core CPU, {torch.get_num_threads()} torch threads, "
          f"load average {load:.1f}), torch {torch.__version__}")
    if args.only in (None, "mas"):
        profile_mas(device)
    if args.only == "mas":
        return
    data_dir = common.make_dataset(common.dataset_dir(args.clips), args.clips)
    model, tokenizer = models.load_voice(common.model_dir(args.model_size))
    models.prepare_for_training(model)
    clips, _ = clip_data.load_clips(data_dir, 16000, os.path.join(data_dir, "cache_bench"), os.cpu_count() or 1)
    clipset = clip_data.ClipSet(clips, tokenizer)
    if args.only in (None, "data"):
        profile_data(clipset, data_dir, device, args.batch_size)
    if args.only in (None, "step"):
        targs = training_flags.parse(["--grad_accum", "1", "--warmup_steps", "0", "--disc_channels", str(disc_channels)])
        trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=disc_channels), targs, device, precision)
        trainer.schedule(100)
        batches = [clip_data.collate(items, 32) for items in make_batches(clipset, args.batch_size, args.steps + 1, 32)[::-1]]
        print(f"\n## One training step, model {args.model_size}, discriminator {disc_channels}, batch {args.batch_size} "
              f"of the longest clips ({batches[1]['mel'].shape[2]} frames, {batches[1]['input_ids'].shape[1]} "
              f"token ids), {precision}, mean of {args.steps}\n")
        profile_step(trainer, batches, device)


if __name__ == "__main__":
    main()
