"""Synthesis speed of one voice three ways, in one run: torch (speak.py), onnxruntime (speak.py --onnx) and
sherpa-onnx (the exported voice as phones and servers run it), at 1 and 2 threads.

The real-time factor is seconds of computing per second of audio (below 1: faster than real time), the median
over the sentences, each spoken --repeats times after one warm-up. The sentences are Kurmanji of 2-8 s as the
voice says them; the voice is random-initialised at the MMS architecture (`--model_size full`, 36M parameters),
so nothing is downloaded: speed does not depend on the weights' values.

    python benchmarks/bench_speak.py                                 # the table for docs/performance.md
    python benchmarks/bench_speak.py --model_size tiny --min_seconds 0 --repeats 1   # a smoke run
"""

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

try:
    from benchmarks import common
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common

from voicetune.common import kurmanji_text  # noqa: E402
from voicetune.common import speech  # noqa: E402
from voicetune.voice import onnx_voice  # noqa: E402
from voicetune.voice import speaking  # noqa: E402


def candidate_texts():
    """Kurmanji texts of growing length: each sentence of the sample release, then two and three joined."""
    sentences = list(common.SENTENCES)
    return sentences + [" ".join(sentences[i:i + 2]) for i in range(0, len(sentences) - 1, 2)] + \
        [" ".join(sentences[i:i + 3]) for i in range(0, len(sentences) - 2, 3)]


def pick_sentences(model, tokenizer, vocab, count, low, high):
    """Up to `count` cleaned texts whose audio lasts low..high seconds, spread over that range."""
    timed = []
    for raw in candidate_texts():
        text, reason = speech.clean_text(kurmanji_text.normalize(raw), vocab)
        if reason:
            continue
        seconds = spoken_seconds(model, tokenizer, text)
        if low <= seconds <= high:
            timed.append((seconds, text))
        if len(timed) == 3 * count:  # enough to spread over the range
            break
    timed.sort()
    if not timed:
        raise SystemExit(f"no sentence lasts {low}-{high} s with this voice; widen --min_seconds/--max_seconds")
    step = max(len(timed) / count, 1)
    return [timed[int(i * step)][1] for i in range(min(count, len(timed)))]


def spoken_seconds(model, tokenizer, text):
    """How long the voice says `text`, with the noise speak.py's default seed gives."""
    voice = speaking.TorchVoice(model, tokenizer)
    with voice.seeded(0):
        return len(voice.say(text)) / voice.sampling_rate


def real_time_factor(say, texts, sampling_rate, repeats):
    """Median over `texts` of compute seconds per audio second (one warm-up call first)."""
    say(texts[0])
    factors = []
    for text in texts:
        spent, audio = 0.0, 0
        for _ in range(repeats):
            start = time.perf_counter()
            samples = say(text)
            spent += time.perf_counter() - start
            audio += len(samples)
        factors.append(spent / (audio / sampling_rate))
    return statistics.median(factors)


def sherpa_engine(folder, threads):
    import sherpa_onnx

    vits = sherpa_onnx.OfflineTtsVitsModelConfig(model=os.path.join(folder, onnx_voice.MODEL_FILE),
                                                 tokens=os.path.join(folder, onnx_voice.TOKENS_FILE))
    tts = sherpa_onnx.OfflineTts(sherpa_onnx.OfflineTtsConfig(
        model=sherpa_onnx.OfflineTtsModelConfig(vits=vits, num_threads=threads), silence_scale=1.0))
    return lambda text: np.asarray(tts.generate(text, sid=0, speed=1.0).samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="full", choices=["tiny", "full"],
                        help="full: VitsConfig() defaults, the MMS architecture; tiny: examples/tiny_model.py. "
                             "(default: %(default)s)")
    parser.add_argument("--threads", default="1,2",
                        help="Thread counts to time, comma-separated. (default: %(default)s)")
    parser.add_argument("--sentences", type=int, default=6, help="Sentences timed. (default: %(default)s)")
    parser.add_argument("--min_seconds", type=float, default=2.0,
                        help="Shortest sentence, seconds of audio. (default: %(default)s)")
    parser.add_argument("--max_seconds", type=float, default=8.0,
                        help="Longest sentence, seconds of audio. (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Times each sentence is spoken per engine. (default: %(default)s)")
    parser.add_argument("--out_dir", default=os.path.join(common.DATA_DIR, "onnx"),
                        help="Where the exported voice is written. (default: %(default)s)")
    args = parser.parse_args(argv)
    import torch

    # 1. The voice, its sentences and its ONNX export.
    model_dir = common.model_dir(args.model_size)
    model, tokenizer = speaking.load(model_dir)
    _, vocab = speech.load_vocab(model_dir)
    texts = pick_sentences(model, tokenizer, vocab, args.sentences, args.min_seconds, args.max_seconds)
    folder = onnx_voice.export(model, tokenizer, os.path.join(args.out_dir, args.model_size))
    rate = model.config.sampling_rate
    seconds = [spoken_seconds(model, tokenizer, t) for t in texts]

    # 2. Each engine at each thread count, on the same sentences.
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        ort = onnx_voice.OnnxVoice(os.path.join(folder, onnx_voice.MODEL_FILE), threads=threads)
        engines = {"torch": lambda text: speaking.say(model, tokenizer, text),
                   "onnxruntime": ort.say,
                   "sherpa-onnx": sherpa_engine(folder, threads)}
        for name, say in engines.items():
            rows.append((name, threads, real_time_factor(say, texts, rate, args.repeats)))

    # 3. The table.
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n{len(texts)} sentences of {min(seconds):.1f}-{max(seconds):.1f} s, {args.model_size} voice "
          f"({params:.1f}M parameters), {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}\n")
    print("| engine | threads | real-time factor | faster than real time |")
    print("|---|---|---|---|")
    for name, threads, rtf in rows:
        print(f"| {name} | {threads} | {rtf:.3f} | {1 / rtf:.1f}x |")
    return rows


if __name__ == "__main__":
    main()
