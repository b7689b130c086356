"""Speed of `speak.py --serve`: requests per second and time to first audio byte at 1 and 4 concurrent clients,
the voice on torch and on onnxruntime (--onnx), through the OpenAI-compatible POST /v1/audio/speech.

The voice is random-initialised at the MMS architecture (`--model_size full`), so nothing is downloaded; each
client sends --requests requests, one Kurmanji sentence of the sample release each (numbers included), after one
warm-up request. The server answers a whole WAV per request, so the first audio byte arrives with the answer.

    python benchmarks/bench_serve.py                                     # the table for docs/performance.md
    python benchmarks/bench_serve.py --model_size tiny --requests 2      # a smoke run
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

try:
    from benchmarks import common
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = ["Ez 25 salî me.", "Roj li pişt çiyayan ava dibe.", "Îro hewa xweş e, germahî 18 pile ye."]


@contextlib.contextmanager
def serving(data_dir, *flags):
    """`speak.py --serve` as a user starts it, on a free port; its address once it prints it."""
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "speak.py"), "--serve", "--data_dir", data_dir,
                               "--port", "0", "--max_concurrent", "4", *flags],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in server.stdout:
            if line.startswith("http://"):
                threading.Thread(target=server.stdout.read, daemon=True).start()  # a full pipe would stall it
                yield line.strip()
                break
        else:
            raise SystemExit(f"speak.py --serve ended without serving (exit {server.wait()})")
    finally:
        server.terminate()
        server.wait()


def ask(url, text):
    """Seconds to the first byte of the answer, and to its end."""
    body = json.dumps(dict(model="tts-1", input=text, voice="default", response_format="wav")).encode()
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=600) as r:
        r.read(1)
        first = time.perf_counter() - start
        r.read()
    return first, time.perf_counter() - start


def measure(url, clients, requests):
    firsts = []

    def client(k):
        for i in range(requests):
            firsts.append(ask(url, TEXTS[(k + i) % len(TEXTS)])[0])

    ask(url, TEXTS[0])  # warm-up
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return dict(clients=clients, requests_per_s=clients * requests / wall, first_audio_median_s=statistics.median(firsts),
                first_audio_max_s=max(firsts))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="full", choices=("tiny", "full"))
    parser.add_argument("--requests", type=int, default=6, help="Requests per client. (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(common.model_dir(args.model_size), os.path.join(tmp, "data", "final_model"))
        for runtime, flags in (("torch", []), ("onnxruntime", ["--onnx", os.path.join(tmp, "onnx")])):
            with serving(os.path.join(tmp, "data"), *flags) as address:
                for clients in (1, 4):
                    rows.append(dict(runtime=runtime, **measure(address + "/v1/audio/speech", clients, args.requests)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model_size} model, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {load:.1f}, {args.requests} requests per client")
    print("| runtime | clients | requests/s | time to first audio, median (s) | worst (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['first_audio_median_s']:.2f} | "
              f"{r['first_audio_max_s']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
