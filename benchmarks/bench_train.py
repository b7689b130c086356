"""Training throughput: train_vits.py's loop against a naive loop, same model, same data, one run.

Both loops drive the same `VitsTrainer.train_window` (discriminator step, then generator step); only
the way batches reach it differs:

- naive: the first train_vits.py's way. Every step reads its clips' WAVs from disk with soundfile, tokenises the
  texts and computes the log-mels on the CPU, in fp32; batches are random (unbucketed, so padded to
  their longest clip); plain, unpinned host-to-device copies.
- ours: train_vits.py's way. Clips preloaded once (`load_clips`: int16 audio + fp16 log-mel in RAM,
  cached on disk), length-bucketed batches, pinned memory with non-blocking copies, and
  `--precision auto` (bf16 on GPUs that have it, else fp16; fp32 on CPU).

The two loops take turns step by step (naive, ours, ours, naive, ...), so a machine that is busy with
something else slows both alike; warm-up steps are not counted. The preload is timed apart: it is paid
once per data set (and again only in seconds, from its cache).

    # the acceptance run: tiny model, 200 clips, CPU (a few minutes on 2 cores)
    python benchmarks/bench_train.py --clips 200 --steps 20 --model_size tiny --device cpu

    # the MMS architecture (36M parameters, full discriminator) on a GPU
    python benchmarks/bench_train.py --clips 1000 --steps 50 --model_size full --device cuda --batch_size 8
    python benchmarks/bench_train.py --clips 1000 --steps 50 --model_size full --device cuda --precision fp32

`--levers` measures train_vits.py's own step instead: each of its speed-ups switched off in turn (fused
AdamW; the critic run on the real slices without a graph in the generator's pass), `--compile` switched
on, with `--host_syncs` the step's host-device synchronisations (the monotonic alignment by the device DP
or the Cython kernel, whichever ours does not take; a host read per logged term instead of one per step),
and with `--against COMMIT` train_vits.py as it was at that commit. Every variant starts from the same
weights and takes the same batch with the same seed at each step, in turns whose order rotates:

    # docs/performance.md's CPU levers: full size, batch 2, fp32, 2 threads, against the step of 288519f
    python benchmarks/bench_train.py --levers --model_size full --batch_size 2 --clips 32 --steps 10 \
        --device cpu --precision fp32 --threads 2 --against 288519f

Data and models are generated under benchmarks/data/ (git-ignored) and reused by later runs.
"""

import argparse
import copy
import importlib
import io
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from voicetune.common import distributed  # noqa: E402
from voicetune.common import run_errors  # noqa: E402
from voicetune.common import speech  # noqa: E402
from voicetune.night import alignment  # noqa: E402
from voicetune.night import clip_data  # noqa: E402
from voicetune.night import training_flags  # noqa: E402
from voicetune.night import vits_trainer  # noqa: E402
from voicetune.voice import models  # noqa: E402
from voicetune.voice import spectrogram  # noqa: E402
from benchmarks import common  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=200, help="Clips in the generated data set.")
    p.add_argument("--steps", type=int, default=20, help="Timed optimizer steps of each loop.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps of each loop first.")
    p.add_argument("--batch_size", type=int, default=8, help="Clips per step (one micro-batch per optimizer step).")
    p.add_argument("--model_size", default="tiny", choices=["tiny", "full"],
                   help="tiny: examples/tiny_model.py; full: VitsConfig() defaults, the MMS architecture (36M).")
    p.add_argument("--disc_channels", type=int, default=None, choices=[64, 128, 256, 512, 1024],
                   help="Widest discriminator layer (default: 64 for tiny, 1024 for full, as MMS).")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto.")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="Precision of ours (the naive loop is always fp32); auto as train_vits.py.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, as train_vits.py runs; 1 measures a machine shared "
                        "with other jobs more steadily, but understates what uses several cores, e.g. fused AdamW).")
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="Preload processes of ours.")
    p.add_argument("--data_dir", default=None,
                   help="Prepared data folder to use or create (default: benchmarks/data/kmr_<clips>_seed<seed>).")
    p.add_argument("--seed", type=int, default=0, help="Seed for data, weights, batches and slices.")
    p.add_argument("--levers", action="store_true",
                   help="Instead of ours against the naive loop: ours against itself with each speed-up switched "
                        "off in turn, in one interleaved run; prints each one's ratio.")
    p.add_argument("--compile", action="store_true",
                   help="With --levers: also ours with train_vits.py --compile (its first step waits minutes for "
                        "the compiler; not timed).")
    p.add_argument("--host_syncs", action="store_true",
                   help="With --levers: also the step's two host-sync levers: the monotonic alignment by whichever of "
                        "the device DP and the Cython kernel ours does not take (alignment.DEVICE_MAS: ours takes the "
                        "DP on CUDA, the kernel on a CPU), and a host read per logged term instead of one per step "
                        "(vits_trainer.ONE_HOST_READ).")
    p.add_argument("--against", metavar="COMMIT", default=None,
                   help="With --levers: also the training step of the project at this git commit (e.g. 288519f), "
                        "its whole tree exported with `git archive`, on the same weights and batches; or a folder "
                        "holding that tree (benchmarks/gpu_session.sh --prepare exports one for a GPU machine).")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("clips", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.clips < args.batch_size:
        parser.error(f"--clips ({args.clips}) must be at least --batch_size ({args.batch_size})")
    if (args.compile or args.against or args.host_syncs) and not args.levers:
        parser.error("--compile, --host_syncs and --against go with --levers")
    if args.disc_channels is None:
        args.disc_channels = 64 if args.model_size == "tiny" else 1024
    return args


# ----------------------------------------------------------------------------------------------------
# The naive data path: disk + CPU mel + tokenizer every step, random batches, plain copies.

class NaiveBatches:
    def __init__(self, data_dir, names, texts, tokenizer, batch_size, sampling_rate, seed):
        self.wavs = os.path.join(data_dir, "wavs")
        self.names, self.texts, self.tokenizer = names, texts, tokenizer
        self.batch_size, self.sr = batch_size, sampling_rate
        self.rng = random.Random(seed)
        self.order = []

    def next(self, segment_frames):
        if len(self.order) < self.batch_size:
            self.order = list(range(len(self.names)))
            self.rng.shuffle(self.order)
        picked, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        audios, mels, ids = [], [], []
        for i in picked:
            audio, sr = sf.read(os.path.join(self.wavs, self.names[i]), dtype="float32")
            if sr != self.sr:
                import librosa
                audio = librosa.resample(audio, orig_sr=sr, target_sr=self.sr)
            audio = torch.from_numpy(audio)
            audios.append(audio)
            mels.append(spectrogram.mel_spectrogram(audio[None], self.sr)[0])
            ids.append(torch.tensor(speech.token_ids(self.tokenizer, self.texts[i])))
        frames = [m.shape[1] for m in mels]
        max_frames = max(max(frames), segment_frames)
        batch = len(picked)
        out = dict(audio=torch.zeros(batch, max_frames * spectrogram.HOP), mel=torch.zeros(batch, spectrogram.N_MELS, max_frames),
                   frames=torch.tensor(frames), input_ids=torch.zeros(batch, max(len(x) for x in ids), dtype=torch.long))
        out["attention_mask"] = torch.zeros_like(out["input_ids"])
        for b in range(batch):
            n = frames[b] * spectrogram.HOP
            out["audio"][b, :n] = audios[b][:n]
            out["mel"][b, :, :frames[b]] = mels[b]
            out["input_ids"][b, :len(ids[b])] = ids[b]
            out["attention_mask"][b, :len(ids[b])] = 1
        return out


def plain_to_device(batch, device):
    """The naive copy: pageable memory, blocking."""
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# Measurement

class Meter:
    """Totals of one loop's timed steps."""

    def __init__(self, name, precision, steps):
        self.name, self.precision, self.steps = name, precision, steps
        self.samples = self.audio_s = self.padded = self.frames = self.skipped = 0
        self.total_s = self.data_s = 0.0
        self.peak = 0


def timed_step(meter, trainer, fetch, device, sr, count):
    """fetch() -> collated CPU batch. One optimizer step; its data time includes the device copy."""
    distributed.sync(device)
    start = time.perf_counter()
    batch = fetch()
    data_s = time.perf_counter() - start
    copy_s = [0.0]

    def timed_copy(b, d, _copy=trainer_copy[meter.name]):
        t = time.perf_counter()
        out = _copy(b, d)
        distributed.sync(device)  # a copy is only done when the device has it
        copy_s[0] += time.perf_counter() - t
        return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        common.reset_peak_rss()
    with mock.patch.object(clip_data, "to_device", timed_copy):
        terms = trainer.train_window([batch])
    distributed.sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else common.peak_rss_bytes()
    if not count:
        return
    meter.peak = max(meter.peak, peak)
    meter.total_s += elapsed
    meter.data_s += data_s + copy_s[0]
    frames = batch["frames"]
    meter.samples += len(frames)
    meter.audio_s += float(frames.sum()) * spectrogram.HOP / sr
    meter.frames += len(frames) * int(batch["mel"].shape[2])
    meter.padded += len(frames) * int(batch["mel"].shape[2]) - int(frames.sum())
    if terms is None:
        meter.skipped += 1  # non-finite loss: train_window skipped the update (timed all the same)


trainer_copy = {"naive": plain_to_device, "ours": clip_data.to_device}


def fmt_bytes(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report(meters, device, header):
    mem = "peak VRAM" if device.type == "cuda" else "peak RSS"
    lines = header + ["",
                      f"| loop | precision | samples/s | audio s/s | data wait | ms/step | padding | {mem} |",
                      "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in meters:
        lines.append(f"| {m.name} | {m.precision} | {m.samples / m.total_s:.2f} | {m.audio_s / m.total_s:.2f} | "
                     f"{100 * m.data_s / m.total_s:.1f}% | {1000 * m.total_s / m.steps:.0f} | "
                     f"{100 * m.padded / max(1, m.frames):.0f}% | {fmt_bytes(m.peak)} |")
    naive, ours = meters
    for m in meters:
        if m.skipped:
            lines.append(f"({m.name}: {m.skipped} of {m.steps} steps non-finite, their updates skipped)")
    lines.append("")
    lines.append(f"speedup {(ours.samples / ours.total_s) / (naive.samples / naive.total_s):.1f}x")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# --levers: train_vits.py's step with one speed-up switched off

class CriticOnRealRowsWithAGraph(vits_trainer.VitsTrainer):
    """The generator's pass as VITS writes it: the critic on real + generated slices together, so the
    backward also runs through the real rows, whose input gradient nobody uses."""

    def generator_critic(self, out):
        with vits_trainer.frozen(self.disc), self.autocast():
            logits, features = self.disc(torch.cat([out["audio"], out["audio_hat"].to(out["audio"].dtype)]))
        half = out["audio"].size(0)
        return ([l[half:] for l in logits], [[f[:half] for f in fs] for fs in features],
                [[f[half:] for f in fs] for fs in features])


def without_fused_adamw(trainer):
    betas, eps = (0.8, 0.99), 1e-9
    trainer.opt_g = torch.optim.AdamW(trainer.model.parameters(), trainer.args.lr, betas=betas, eps=eps, fused=False)
    trainer.opt_d = torch.optim.AdamW(trainer.disc.parameters(), trainer.args.lr, betas=betas, eps=eps, fused=False)
    return trainer


def with_setting(trainer, module, name, value):
    """The trainer with module.name = value during its steps: a lever that is a module's setting."""
    step = trainer.train_window

    def train_window(*args, **kwargs):
        with mock.patch.object(module, name, value):
            return step(*args, **kwargs)
    trainer.train_window = train_window
    return trainer


def trainer_at(commit):
    """(VitsTrainer class, flag parser) of the project as it was at a git commit: its whole tree exported to
    a temporary folder and imported there, apart from today's modules of the same names. `commit` may also
    be a folder holding such an exported tree (a GPU machine gets the working tree without .git)."""
    if os.path.isdir(commit):
        tree = os.path.abspath(commit)
    else:
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit], capture_output=True)
        if archive.returncode:
            raise SystemExit(f"error: --against {commit}: {archive.stderr.decode().strip()}")
        tree = tempfile.mkdtemp(prefix=f"bench_train_{commit}_")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tree, filter="data")
    names = [name[:-3] for name in os.listdir(tree) if name.endswith(".py")]
    today = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, tree)
    try:
        # Older trees kept the step and the flags in train_vits.py itself.
        flags = importlib.import_module("training_flags" if "training_flags" in names else "train_vits")
        step = importlib.import_module("vits_trainer" if "vits_trainer" in names else "train_vits")
        return step.VitsTrainer, getattr(flags, "parse", None) or flags.parse_args
    finally:
        sys.path.remove(tree)
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(today)


def lever_variants(model, disc, args, targs, device, precision):
    """name -> trainer, every one from the same weights; 'ours' is train_vits.py as it is."""
    def fresh(cls=vits_trainer.VitsTrainer, module_args=targs):
        return cls(copy.deepcopy(model), copy.deepcopy(disc), module_args, device, precision)
    variants = {"ours": fresh(),
                "fused AdamW off": without_fused_adamw(fresh()),
                "critic on the real rows with a graph": fresh(CriticOnRealRowsWithAGraph)}
    if args.compile:
        compiled = copy.copy(targs)
        compiled.compile = True
        variants["ours with --compile"] = fresh(module_args=compiled)
    if args.host_syncs:
        if alignment.use_device_mas(device):
            variants["MAS by the Cython kernel (a host sync)"] = with_setting(fresh(), alignment, "DEVICE_MAS", "off")
        else:
            variants["MAS by the device DP"] = with_setting(fresh(), alignment, "DEVICE_MAS", "on")
        variants["a host read per logged term"] = with_setting(fresh(), vits_trainer, "ONE_HOST_READ", False)
    if args.against:
        old_trainer, old_parse = trainer_at(args.against)
        old_args = old_parse(["--batch_size", str(args.batch_size), "--grad_accum", "1", "--warmup_steps", "0",
                                   "--disc_channels", str(args.disc_channels), "--seed", str(args.seed)])
        variants[f"the step at {args.against}"] = fresh(old_trainer, old_args)
    for trainer in variants.values():
        trainer.schedule(args.warmup + args.steps + 1)
    return variants


def run_levers(variants, fetch, device, args):
    """Every variant takes each batch in turn (the order rotates every step).

    Returns name -> step times and name -> the generator loss of every step (a speed-up changes no number).
    """
    names = list(variants)
    times, losses = {name: [] for name in names}, {name: [] for name in names}
    print(f"bench_train --levers: {args.warmup} warm-up + {args.steps} timed steps of {len(names)} variants ...",
          flush=True)
    for step in range(args.warmup + args.steps):
        batch = fetch()
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            torch.manual_seed(args.seed * 1000 + step)
            distributed.sync(device)
            start = time.perf_counter()
            terms = variants[name].train_window([batch])
            distributed.sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
            losses[name].append(terms["g"] if terms else float("nan"))
            if terms is None:
                print(f"  step {step}: {name}: non-finite, skipped (timed all the same)")
    return times, losses


def lever_report(times, losses, header):
    lines = header + ["", "| variant | median ms/step | mean ms/step | ours is faster by | generator loss vs ours |",
                      "|---|---:|---:|---:|---:|"]
    for name, spent in times.items():
        ratio = statistics.median([t / o for t, o in zip(spent, times["ours"])])
        differ = max(abs(a - b) / abs(b) for a, b in zip(losses[name], losses["ours"]))
        lines.append(f"| {name} | {1000 * statistics.median(spent):.0f} | {1000 * statistics.mean(spent):.0f} | "
                     f"{ratio:.2f}x | {differ:.1e} |")
    lines.append("")
    lines.append("ours is faster by: the variant's step time over ours on the same batch, median over the steps "
                 "(above 1 the switched-off speed-up wins; for --compile and the device DP on a CPU, below 1 the "
                 "variant wins). generator loss vs ours: the largest relative difference over all steps, warm-up "
                 "included.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    try:
        device = distributed.resolve_device(args.device)
        precision, _ = vits_trainer.resolve_precision(args.precision, device)
    except run_errors.TrainingError as err:
        raise SystemExit(f"error: {err}")
    if args.threads:
        torch.set_num_threads(args.threads)

    # 1. Data and model, generated once under benchmarks/data/.
    data_dir = args.data_dir or common.dataset_dir(args.clips, args.seed)
    common.make_dataset(data_dir, args.clips, args.seed)
    model, tokenizer = models.load_voice(common.model_dir(args.model_size))
    models.prepare_for_training(model)
    disc = models.VitsDiscriminator(max_channels=args.disc_channels)
    sr = model.config.sampling_rate
    targs = training_flags.parse(["--batch_size", str(args.batch_size), "--grad_accum", "1", "--warmup_steps", "0",
                           "--disc_channels", str(args.disc_channels), "--seed", str(args.seed)])

    # 2. Ours: the preload, timed apart (bench_preload.py measures it at scale, first and cached).
    cache_dir = os.path.join(data_dir, "cache_bench")
    entries = speech.read_metadata(os.path.join(data_dir, "metadata.csv"))
    cached = os.path.isfile(clip_data.cache_path(cache_dir, os.path.join(data_dir, "wavs"), entries, sr))
    rss_before = common.rss_bytes()
    start = time.perf_counter()
    clips, _ = clip_data.load_clips(data_dir, sr, cache_dir, args.num_workers)
    preload_s = time.perf_counter() - start
    preload_rss = max(0, common.rss_bytes() - rss_before)
    held = sum(a.nbytes + m.nbytes for _, _, a, m in clips)
    clipset = clip_data.ClipSet(clips, tokenizer)
    lengths = [clipset.frames(i) for i in range(len(clipset))]
    hours = sum(lengths) * spectrogram.HOP / sr / 3600

    buckets, epoch = [], [0]

    def ours_fetch():
        if not buckets:
            epoch[0] += 1
            buckets.extend(clip_data.bucket_batches(lengths, args.batch_size, args.seed * 1000 + epoch[0]))
        return clip_data.collate([(clipset, i) for i in buckets.pop()], targs.segment_frames)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    dparams = sum(p.numel() for p in disc.parameters()) / 1e6
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = [
        f"model {args.model_size} ({params:.1f}M generator, discriminator max_channels {args.disc_channels}: "
        f"{dparams:.1f}M), batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"device {device} ({gpu}, {torch.get_num_threads()} torch threads, load average {load:.1f}), "
        f"{precision}, torch {torch.__version__}",
        f"data: {len(clipset)} clips, {hours:.2f} h, mean {hours * 3600 / len(clipset):.2f} s ({data_dir})",
    ]
    if args.levers:
        variants = lever_variants(model, disc, args, targs, device, precision)
        times, losses = run_levers(variants, ours_fetch, device, args)
        print(lever_report(times, losses, header))
        return times, losses

    # 3. Two trainers from the same weights; naive reads the same clips (ClipSet's filter) from disk.
    trainers = {}
    for name, prec in (("naive", "fp32"), ("ours", precision)):
        trainers[name] = vits_trainer.VitsTrainer(copy.deepcopy(model), copy.deepcopy(disc), targs, device, prec)
        trainers[name].schedule(args.warmup + args.steps + 1)
    naive_data = NaiveBatches(data_dir, clipset.names, clipset.texts, tokenizer, args.batch_size, sr, args.seed)
    fetch = {"naive": lambda: naive_data.next(targs.segment_frames), "ours": ours_fetch}
    meters = {"naive": Meter("naive", "fp32", args.steps), "ours": Meter("ours", precision, args.steps)}

    # 4. Take turns: naive, ours, ours, naive, ... (ABBA), warm-up first.
    print(f"bench_train: {args.warmup} warm-up + {args.steps} timed steps of each loop ...", flush=True)
    for step in range(args.warmup + args.steps):
        order = ("naive", "ours") if step % 2 == 0 else ("ours", "naive")
        for name in order:
            timed_step(meters[name], trainers[name], fetch[name], device, sr, count=step >= args.warmup)

    header.append(f"ours preload (paid once, not in the table): {preload_s:.1f} s "
                  f"({'from its cache' if cached else 'decoded'}), {fmt_bytes(held)} held in RAM (int16 audio + fp16 "
                  f"log-mel), process RSS +{fmt_bytes(preload_rss)} after it")
    print(report([meters["naive"], meters["ours"]], device, header))
    return meters


if __name__ == "__main__":
    main()
