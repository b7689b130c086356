"""prepare_data.py throughput: the same clips as a Common Voice folder and as a Hugging Face parquet dataset.

A Common Voice-shaped release of N clips (`clips/*.mp3` at 32 kHz, as most Common Voice clips are, and
`validated.tsv` as examples/make_release.py writes it) is generated once under benchmarks/data/ from
benchmarks/common.py's espeak-ng speech pool (each clip a varied pool entry, so 2,000 clips take a minute,
not the half hour of one espeak-ng call per clip), and converted to a parquet dataset in Common Voice's export
layout (`data/train-0000K-of-0000M.parquet`: `audio` struct with the MP3 bytes, `path`, `sentence`,
votes). Each round prepares both inputs into fresh output folders (nothing cached), the two inputs taking
turns so a busy machine slows both alike. Reported per run: clips/s of the decoding stage (the report's
`clips_per_second`) and of the whole run (reading the clip list, text, decoding, writing), and peak RSS.

    python benchmarks/bench_prepare.py                       # 2,000 clips, 3 rounds
    python benchmarks/bench_prepare.py --clips 200 --rounds 1 --workers 1
"""

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from examples.make_release import CLIP_COLUMNS, client_id, tsv_row, write_mp3, write_tsv  # noqa: E402

CLIP_RATE = 32000  # most Common Voice MP3s

SHARD_ROWS = 1000  # rows per parquet file, about the size the Hub's shards hold for speech


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=2000, help="Clips in the generated release. (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="Runs of each input, taking turns. (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="prepare_data.py --workers. (default: all cores, %(default)s)")
    return p


def release_dir(n_clips, seed=0):
    """A generated Common Voice language folder of `n_clips` MP3 clips by 20 speakers, made once."""
    out = os.path.join(common.DATA_DIR, f"cv_kmr_{n_clips}_seed{seed}")
    if os.path.isfile(os.path.join(out, "validated.tsv")):
        return out
    pool = common.speech_pool(CLIP_RATE)
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "clips"), exist_ok=True)
    rows = []
    for i in range(n_clips):
        text, audio = common.vary(pool, rng, CLIP_RATE)
        name = f"common_voice_kmr_{40000000 + i}.mp3"
        write_mp3(os.path.join(out, "clips", name), audio, CLIP_RATE)
        rows.append(tsv_row(client_id(i % 20), name, text))
    write_tsv(os.path.join(out, "validated.tsv"), CLIP_COLUMNS, rows)  # last: a killed run is redone
    return out


def parquet_dataset(release):
    """The release as a parquet dataset in Common Voice's Hugging Face export layout, made once."""
    out = release + "_parquet"
    if os.path.isdir(out):
        return out
    with open(os.path.join(release, "validated.tsv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    tmp = out + f".tmp{os.getpid()}"
    os.makedirs(os.path.join(tmp, "data"))
    shards = range(0, len(rows), SHARD_ROWS)
    for k, start in enumerate(shards):
        part = rows[start:start + SHARD_ROWS]
        audio = []
        for row in part:
            with open(os.path.join(release, "clips", row["path"]), "rb") as f:
                audio.append({"bytes": f.read(), "path": row["path"]})
        table = pa.table({
            "client_id": [row["client_id"] for row in part], "path": [row["path"] for row in part],
            "audio": pa.array(audio, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "sentence": [row["sentence"] for row in part],
            "up_votes": pa.array([int(row["up_votes"]) for row in part], pa.int64()),
            "down_votes": pa.array([int(row["down_votes"]) for row in part], pa.int64()),
            "gender": [row["gender"] for row in part]})
        # Row groups of 100 rows, as `datasets` writes audio datasets.
        pq.write_table(table, os.path.join(tmp, "data", f"train-{k:05d}-of-{len(shards):05d}.parquet"),
                       row_group_size=100)
    os.replace(tmp, out)
    return out


def run_one(input_path, output_dir, workers):
    """One prepare_data.py run, as a user runs it; returns its report figures, wall time and the peak RSS of
    its main process (sampled every 50 ms: the workers hold one clip each)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--input", input_path,
                                "--output_dir", output_dir, "--model", common.model_dir("tiny"),
                                "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    watched = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    if process.wait() != 0:
        sys.exit(f"prepare_data.py failed on {input_path} (exit {process.returncode})")
    wall = time.perf_counter() - start
    with open(os.path.join(output_dir, "prepare_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return dict(kept=report["kept_clips"], decoded=report["decoded_clips"], decode_cps=report["clips_per_second"],
                wall=wall, wall_cps=report["decoded_clips"] / wall, peak=peak)


def main(argv=None):
    args = build_parser().parse_args(argv)
    release = release_dir(args.clips)
    inputs = {"folder": release, "parquet": parquet_dataset(release)}
    common.model_dir("tiny")  # built once, outside the timed runs
    results = {name: [] for name in inputs}
    out_root = os.path.join(common.DATA_DIR, "bench_prepare_out")
    for r in range(args.rounds):
        for name, path in (inputs.items() if r % 2 == 0 else reversed(inputs.items())):
            out = os.path.join(out_root, name)
            shutil.rmtree(out, ignore_errors=True)
            res = run_one(path, out, args.workers)
            results[name].append(res)
            print(f"round {r + 1} {name:<8} kept {res['kept']} decoded {res['decoded']} | decoding "
                  f"{res['decode_cps']:.1f} clips/s | whole run {res['wall']:.1f} s = {res['wall_cps']:.1f} clips/s "
                  f"| peak RSS {res['peak'] / 2**20:.0f} MiB (main process)", flush=True)
    shutil.rmtree(out_root, ignore_errors=True)
    print(f"\n{args.clips} clips, --workers {args.workers}, load average {os.getloadavg()[0]:.1f}")
    print("| input | decoding clips/s (each round) | whole run clips/s (each round) | peak RSS, main process |")
    print("|---|---|---|---:|")
    for name, runs in results.items():
        decode = " / ".join(f"{x['decode_cps']:.1f}" for x in runs)
        whole = " / ".join(f"{x['wall_cps']:.1f}" for x in runs)
        print(f"| {name} | {decode} | {whole} | {max(x['peak'] for x in runs) / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
