"""How long the listening queue takes to rank a pool (train_feedback.py --listen N, voicetune/feedback/
listen_queue.py): the cheap scores (rarity, history, instability: the text encoder and duration predictor
with SEEDS noise draws a sentence) of --sentences pool sentences, on the CPU, one thread.

    python benchmarks/bench_queue.py --sentences 2000              # the tiny voice (examples/tiny_model.py)
    python benchmarks/bench_queue.py --model_size full --sentences 100   # a full-size random-init VitsConfig()
"""

import argparse
import os
import random
import sys
import tempfile
import time

import torch
from transformers import VitsConfig, VitsModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
from examples.tiny_model import make_tiny_model, make_tokenizer  # noqa: E402
from voicetune.common import speech  # noqa: E402
from voicetune.feedback import listen_queue  # noqa: E402


def pool_sentences(n, seed=0):
    """n different sentences made of the shipped examples' words, 3-14 words each."""
    words = " ".join(listen_queue.read_lines(listen_queue.EXAMPLES)).split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + "." for _ in range(n)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", choices=("tiny", "full"), default="tiny",
                        help="The tiny test voice, or a random-init voice of MMS's size. (default: %(default)s)")
    parser.add_argument("--sentences", type=int, default=2000,
                        help="How many pool sentences to rank. (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads. (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        if args.model_size == "tiny":
            make_tiny_model(folder)
        else:
            tokenizer = make_tokenizer(folder)
            torch.manual_seed(0)
            VitsModel(VitsConfig(vocab_size=len(tokenizer))).save_pretrained(folder)
        model, tokenizer = listen_queue.speaking.load(folder)
        _, vocab = speech.load_vocab(folder)
    sentences = pool_sentences(args.sentences)
    training = pool_sentences(500, seed=1)
    started = time.perf_counter()
    candidates = listen_queue.build_pool([("bench", s) for s in sentences], vocab, set())
    listen_queue.score(candidates, model, tokenizer, vocab, training, training[:50])
    listen_queue.rank(candidates)
    seconds = time.perf_counter() - started
    print(f"{args.model_size} voice ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
          f"{len(candidates)} sentences, {args.threads} thread(s): {seconds:.1f} s, "
          f"{1000 * seconds / len(candidates):.1f} ms a sentence")


if __name__ == "__main__":
    main()
