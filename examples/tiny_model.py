"""Build a tiny random-initialised VITS voice with a Kurmanji Latin tokenizer, fully offline.

Tests and the README demo use it instead of downloading `facebook/mms-tts-kmr-script_latin`; it has the
same architecture family (stochastic duration predictor, 256x HiFi-GAN upsampling, 16 kHz), only smaller.

    python examples/tiny_model.py --output_dir example_run/tiny_model
"""

import argparse
import json
import os
import tempfile

import torch
from transformers import VitsConfig, VitsModel, VitsTokenizer

# id 0 is the pad/blank token, as in MMS vocabularies; "_" never occurs in prepared text.
KURMANJI_VOCAB = ["_", " ", "'", "-"] + list("abcdefghijklmnopqrstuvwxyz") + list("çêîşû")


def tiny_config(vocab_size):
    return VitsConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=64,
        flow_size=16,
        spectrogram_bins=513,
        prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=2,
        posterior_encoder_num_wavenet_layers=2,
        duration_predictor_filter_channels=32,
        duration_predictor_num_flows=2,
        upsample_initial_channel=32,
        upsample_rates=[8, 8, 2, 2],
        upsample_kernel_sizes=[16, 16, 4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        sampling_rate=16000,
        layerdrop=0.0,
        pad_token_id=0,
    )


def make_tokenizer(output_dir):
    vocab = {ch: i for i, ch in enumerate(KURMANJI_VOCAB)}
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        tokenizer = VitsTokenizer(vocab_file, pad_token="_", unk_token="<unk>", add_blank=True,
                                  normalize=True, phonemize=False)
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def make_tiny_model(output_dir, seed=0):
    """Write a tiny VitsModel + VitsTokenizer to `output_dir` and return the folder."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(output_dir)
    # len(tokenizer) also counts the added <unk>, so every id the tokenizer can emit has an embedding.
    VitsModel(tiny_config(len(tokenizer))).save_pretrained(output_dir)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="example_run/tiny_model", help="Folder to write the model to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random initialisation.")
    args = parser.parse_args(argv)
    make_tiny_model(args.output_dir, args.seed)
    print(f"tiny model written to {args.output_dir}")


if __name__ == "__main__":
    main()
