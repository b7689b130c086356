"""Preload cost of train_vits.py at scale: time (first and cached) and RAM for N clips, extrapolated to 42k.

For each N the preload runs in a fresh Python process, so its RAM is its own:
- first: `load_clips` with no cache: sf.info estimate, parallel decode + log-mel, cache written;
- cached: `load_clips` again, reading that cache;
- held: bytes of the arrays the trainer keeps (int16 audio + fp16 log-mel), exact;
- RSS: the process's resident memory after the cached load (minus that of the bare imports), and the
  peak during the first load (which also builds the cache file).
Time and RAM are fitted per hour of audio (least squares, with a fixed cost) and extrapolated to the real
Common Voice Kurmanji set: 42,139 clips, ~23 h, printed next to the 5.21 GB + 2-3 GB the first train_vits.py estimated.

    python benchmarks/bench_preload.py                       # 1k, 5k, 20k clips (generates ~1.8 GB of wavs once)
    python benchmarks/bench_preload.py --sizes 200,1000      # quick look

Note: the wavs were just written, so "first" reads them from the page cache, as a second night would;
a cold disk adds its read time (23 h of 16 kHz PCM is 2.6 GB).
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from voicetune.common import speech  # noqa: E402
from voicetune.night import clip_data  # noqa: E402
from benchmarks import common  # noqa: E402

TARGET_CLIPS, TARGET_HOURS = 42139, 23.0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,5000,20000", help="Comma-separated clip counts to preload.")
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="Preload processes (as train_vits.py).")
    p.add_argument("--data_dir", default=None,
                   help="Prepared data folder with at least max(sizes) clips, made if missing "
                        "(default: benchmarks/data/kmr_<max>_seed<seed>).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the generated clips.")
    p.add_argument("--keep_caches", action="store_true", help="Keep the preload caches written (default: removed).")
    p.add_argument("--_one", nargs=3, metavar=("DATA_DIR", "CACHE_DIR", "N"), help=argparse.SUPPRESS)
    return p


def measure_one(data_dir, cache_dir, n, workers):
    """In a fresh process: one load_clips call; returns its time, held bytes and RSS figures."""
    base = common.rss_bytes()
    common.reset_peak_rss()
    start = time.perf_counter()
    clips, errors = clip_data.load_clips(data_dir, 16000, cache_dir, workers, max_samples=n)
    seconds = time.perf_counter() - start
    held = sum(a.nbytes + m.nbytes for _, _, a, m in clips)
    samples = sum(len(a) for _, _, a, m in clips)
    return dict(seconds=seconds, clips=len(clips), errors=len(errors), hours=samples / 16000 / 3600, held=held,
                rss=common.rss_bytes() - base, peak=common.peak_rss_bytes() - base)


def run_one(data_dir, cache_dir, n, workers):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--num_workers", str(workers),
                          "--_one", data_dir, cache_dir, str(n)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"preload of {n} clips failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_line(xs, ys):
    """Least-squares y = a + b x (a = 0 with a single point)."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def gb(n):
    return n / 1e9


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args._one:
        data_dir, cache_dir, n = args._one
        print(json.dumps(measure_one(data_dir, cache_dir, int(n), args.num_workers)))
        return None
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"--sizes {args.sizes}: give comma-separated clip counts, e.g. 1000,5000,20000")
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"--sizes {args.sizes}: clip counts must be at least 1")

    # 1. One generated set of max(sizes) clips; smaller sizes preload its first N (max_samples).
    data_dir = args.data_dir or common.dataset_dir(sizes[-1], args.seed)
    start = time.perf_counter()
    common.make_dataset(data_dir, sizes[-1], args.seed)
    print(f"data: {data_dir} ({sizes[-1]} clips, ready in {time.perf_counter() - start:.0f} s)", flush=True)

    # 2. Each size: first (no cache), then cached, each in a fresh process.
    entries = speech.read_metadata(os.path.join(data_dir, "metadata.csv"))
    rows = []
    for n in sizes:
        cache_dir = os.path.join(data_dir, f"cache_preload_{n}")
        cache = clip_data.cache_path(cache_dir, os.path.join(data_dir, "wavs"), entries[:n], 16000)
        if os.path.exists(cache):
            os.remove(cache)
        first = run_one(data_dir, cache_dir, n, args.num_workers)
        cached = run_one(data_dir, cache_dir, n, args.num_workers)
        cache_bytes = os.path.getsize(cache)
        if not args.keep_caches:
            os.remove(cache)
        rows.append(dict(n=n, first=first, cached=cached, cache_bytes=cache_bytes))
        print(f"  {n} clips: first {first['seconds']:.1f} s, cached {cached['seconds']:.1f} s, "
              f"held {gb(first['held']):.3f} GB", flush=True)

    # 3. Table, fit per hour of audio, extrapolation.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\npreload with {args.num_workers} workers on a {os.cpu_count()}-core machine (load average {load:.1f}); "
          "GB = 10^9 bytes\n")
    print("| clips | hours | first | cached | held (int16 audio + fp16 mel) | RSS after cached load | "
          "peak RSS, first load | cache file |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, c = r["first"], r["cached"]
        print(f"| {f['clips']:,} | {f['hours']:.2f} | {f['seconds']:.1f} s | {c['seconds']:.1f} s | "
              f"{gb(f['held']):.3f} GB | {gb(c['rss']):.3f} GB | {gb(f['peak']):.3f} GB | {gb(r['cache_bytes']):.3f} GB |")
    hours = [r["first"]["hours"] for r in rows]
    fits = {name: fit_line(hours, [get(r) for r in rows]) for name, get in (
        ("first", lambda r: r["first"]["seconds"]), ("cached", lambda r: r["cached"]["seconds"]),
        ("held", lambda r: r["first"]["held"]), ("rss", lambda r: r["cached"]["rss"]),
        ("peak", lambda r: r["first"]["peak"]))}

    def at(name, h=TARGET_HOURS):
        a, b = fits[name]
        return a + b * h

    clips = [r["first"]["clips"] for r in rows]
    per_clip = fit_line(clips, [r["first"]["seconds"] for r in rows])
    mean_s = sum(r["first"]["hours"] for r in rows) * 3600 / sum(r["first"]["clips"] for r in rows)
    print(f"\nfit per hour of audio (generated clips average {mean_s:.2f} s; the real set {TARGET_HOURS * 3600 / TARGET_CLIPS:.2f} s):")
    print(f"  first preload {fits['first'][1]:.1f} s/h (+{fits['first'][0]:.1f} s), cached {fits['cached'][1]:.2f} s/h "
          f"(+{fits['cached'][0]:.1f} s), held {gb(fits['held'][1]):.3f} GB/h, RSS {gb(fits['rss'][1]):.3f} GB/h, "
          f"peak {gb(fits['peak'][1]):.3f} GB/h")
    print(f"\nextrapolated to {TARGET_CLIPS:,} clips / {TARGET_HOURS:.0f} h:")
    print("| | ours | the first train_vits.py's estimate |")
    print("|---|---:|---:|")
    print(f"| RAM held for training | {gb(at('held')):.2f} GB | 5.21 GB + 2-3 GB |")
    print(f"| process RSS after a cached preload | {gb(at('rss')):.2f} GB | |")
    print(f"| peak RSS during the first preload | {gb(at('peak')):.2f} GB | |")
    print(f"| first preload (fitted per hour; per clip) | {at('first') / 60:.1f} min; "
          f"{(per_clip[0] + per_clip[1] * TARGET_CLIPS) / 60:.1f} min | |")
    print(f"| cached preload | {at('cached'):.0f} s | |")
    return rows


if __name__ == "__main__":
    main()
