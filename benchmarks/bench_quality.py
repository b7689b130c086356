"""Does fine-tuning make the voice better? A night in miniature on the CPU, measured by voice quality.

1. A base voice: a small VITS trained from scratch with train_vits.py on espeak-ng Kurmanji in one voice
   (`ku`, speed 165, pitch 45); cached under benchmarks/data/quality/.
2. A fine-tune of that base on another voice (`ku+f2`: female variant, slower, higher) with train_vits.py
   as a user runs it, for a fixed number of epochs.
3. Every epoch: MCD-DTW, duration ratio and DNSMOS on held-out sentences of the new voice (train_vits.py's
   own eval_* metrics) and of the old voice (forgetting), and the validation mel loss of both. A table,
   `quality:` lines to diff between versions, and a PNG plot (matplotlib: benchmarks/requirements.txt).

The held-out clips are single sentences that no training clip of either voice contains, and they are the
clips train_vits.py's own hash split holds out.

    python benchmarks/bench_quality.py            # small model, ~15 min on a 2-core CPU
    python benchmarks/bench_quality.py --quick    # tiny model, a smoke run

`--case speakers` instead trains both voices as two speakers of one data set (speakers.csv), once as one
pooled voice and once with train_vits.py --speakers 2, the same steps from the same base, and measures
each voice's held-out clips as spoken by each speaker (docs/performance.md, Many voices).
"""

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from transformers import VitsModel  # noqa: E402

from voicetune.common import speech  # noqa: E402
from voicetune.night import checkpoints  # noqa: E402
from voicetune.night import clip_data  # noqa: E402
from voicetune.night import training_flags  # noqa: E402
from voicetune.night import vits_trainer  # noqa: E402
from voicetune.voice import models  # noqa: E402
from voicetune.voice import speakers  # noqa: E402
from voicetune.voice import voice_quality  # noqa: E402
from benchmarks.common import DATA_DIR, SAMPLING_RATE  # noqa: E402
from examples.make_release import SENTENCES, espeak_clip  # noqa: E402
from examples.tiny_model import KURMANJI_VOCAB, make_tokenizer, tiny_config  # noqa: E402

# (espeak-ng voice, words per minute, pitch 0-99) of the base voice and of the voice it is tuned to.
OLD_VOICE = ("ku", 165, 45)
NEW_VOICE = ("ku+f2", 125, 75)
# Per size: clips per voice, held-out sentences, base steps, fine-tune epochs, eval clips.
SIZES = dict(small=dict(clips=120, held_out=8, base_steps=300, epochs=5, eval_clips=8),
             tiny=dict(clips=40, held_out=2, base_steps=30, epochs=2, eval_clips=2))


def small_config(vocab_size):
    """Between the test model (0.2M) and MMS (36M): 2.4M parameters, a step about twice the tiny one's."""
    config = tiny_config(vocab_size)
    config.update(dict(hidden_size=96, num_hidden_layers=3, ffn_dim=256, flow_size=64,
                       posterior_encoder_num_wavenet_layers=6, prior_encoder_num_wavenet_layers=3,
                       duration_predictor_filter_channels=96, upsample_initial_channel=96,
                       resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3], [1, 3]]))
    return config


def init_model(out_dir, size):
    """A random-initialised VitsModel + the Kurmanji tokenizer, made once."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    torch.manual_seed(0)
    tokenizer = make_tokenizer(out_dir)
    config = tiny_config(len(tokenizer)) if size == "tiny" else small_config(len(tokenizer))
    VitsModel(config).save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------
# Data: one espeak-ng voice per folder, held-out sentences never inside a training clip.

def sentence_split(held_out):
    vocab = set(KURMANJI_VOCAB[1:])
    sentences = [speech.clean_text(s, vocab)[0] for s in SENTENCES]
    sentences = [s for s in sentences if s]
    return sentences[:held_out], sentences[held_out:]


def make_voice_data(out_dir, voice, n_clips, held_out, seed=0):
    """A prepared folder (wavs/ + metadata.csv) of one voice; reused when it already holds n_clips.

    The clips train_vits.py will hold out (by its hash of the names) each say one held-out sentence;
    every other clip joins one to three of the remaining sentences."""
    metadata = os.path.join(out_dir, "metadata.csv")
    if os.path.isfile(metadata):
        with open(metadata, encoding="utf-8") as f:
            if sum(1 for line in f if line.strip()) == n_clips:
                return out_dir
    evaluation, training = sentence_split(held_out)
    names = [f"clip_{i:04d}.wav" for i in range(n_clips)]
    held = [names[i] for i in clip_data.held_out_indices(names, held_out)]
    rng = random.Random(seed)
    texts = {name: evaluation[k] for k, name in enumerate(held)}
    for name in names:
        texts.setdefault(name, " ".join(rng.sample(training, rng.randint(1, 3))))
    os.makedirs(os.path.join(out_dir, "wavs"), exist_ok=True)
    name_of, speed, pitch = voice

    def render(name):
        audio = speech.trim_silence(espeak_clip(texts[name], SAMPLING_RATE, name_of, speed, pitch))
        sf.write(os.path.join(out_dir, "wavs", name), audio, SAMPLING_RATE, subtype="PCM_16")

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        list(pool.map(render, names))
    with open(metadata + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(f"{name}|{texts[name]}\n" for name in names)
    os.replace(metadata + ".tmp", metadata)
    return out_dir


def held_out_clips(data_dir, model_dir, held_out):
    """The clips train_vits.py holds out of data_dir, as a ClipSet."""
    _, tokenizer = models.load_voice(model_dir)
    clips, _ = clip_data.load_clips(data_dir, SAMPLING_RATE, os.path.join(data_dir, "cache"), 1)
    return clip_data.split_validation(clip_data.ClipSet(clips, tokenizer), held_out)[1]


# ----------------------------------------------------------------------------------------------------
# Training (train_vits.py's main, with the flags a user would pass) and measuring.

def common_flags(args):
    return ["--device", "cpu", "--batch_size", "8", "--grad_accum", "1", "--disc_channels", "64",
            "--num_workers", "1", "--benchmark_samples", "0", "--logging_steps", "10"]


def train_base(args, size, init_dir, old_dir):
    out = os.path.join(args.data_dir, f"base_{size}_{args.clips}clips_{args.base_steps}steps")
    if os.path.isfile(os.path.join(out, "final_model", "model.safetensors")):
        print(f"base voice: {out}/final_model (cached)")
        return os.path.join(out, "final_model")
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    train(["--model", init_dir, "--data_dir", old_dir, "--output_dir", out, "--lr", "1e-3",
           "--max_steps", str(args.base_steps), "--epochs", "1000", "--warmup_steps", "20",
           "--d_warmup_steps", "20", "--val_size", str(args.held_out), "--eval_clips", "0"] + common_flags(args),
          "base voice training", args.threads)
    print(f"base voice: {args.base_steps} steps in {(time.time() - start) / 60:.1f} min")
    return os.path.join(out, "final_model")


def quality(trainer, clipset, n_clips):
    return dict(val_mel=trainer.evaluate(clipset, 8)["mel"], **voice_quality.evaluate_quality(trainer.model, clipset, n_clips))


def train(flags, what, threads, tree=ROOT):
    """train_vits.py of `tree` (this one, or a commit's exported by tree_at) as a user runs it, on `threads`
    torch threads."""
    code = subprocess.run([sys.executable, os.path.join(tree, "train_vits.py")] + flags, cwd=tree,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads))).returncode
    if code != 0:
        sys.exit(f"{what} failed (exit {code})")


def tree_at(commit):
    """The project's whole tree at a git commit, exported to a temporary folder."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit], capture_output=True)
    if archive.returncode:
        sys.exit(f"error: --against {commit}: {archive.stderr.decode().strip()}")
    tree = tempfile.mkdtemp(prefix=f"bench_quality_{commit}_")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def critic_flags(args, base_dir):
    """The fine-tune's critic: the base voice's own (pretrained) or a fresh one trained alone first."""
    if args.critic == "pretrained":
        return ["--discriminator", os.path.join(base_dir, "discriminator.pt")]
    # A tree from before --discriminator auto trains a fresh critic when the flag is not given.
    fresh = [] if args.against else ["--discriminator", "none"]
    return fresh + ["--d_warmup_steps", str(args.d_warmup_steps)]


def checkpoint_quality(trainer, path, clipset, n_clips):
    """quality() of the voice an epoch checkpoint holds."""
    trainer.model.load_state_dict(checkpoints.read_checkpoint(path)["trainer"]["model"])
    return quality(trainer, clipset, n_clips)


def fine_tune(args, base_dir, new_dir, old_val):
    """train_vits.py on the new voice from the base; returns {epoch: row} with epoch 0 the base itself."""
    model, tokenizer = models.load_voice(base_dir)
    models.prepare_for_training(model)
    flags = training_flags.parse(["--device", "cpu"])
    trainer = vits_trainer.VitsTrainer(model, models.load_discriminator(os.path.join(base_dir, "discriminator.pt")),
                                       flags, torch.device("cpu"), "fp32")
    new_val = held_out_clips(new_dir, base_dir, args.held_out)
    rows = {0: dict(step=0, minutes=0.0, new=quality(trainer, new_val, args.eval_clips),
                    old=quality(trainer, old_val, args.eval_clips))}
    out = os.path.join(args.data_dir, "fine_tune_" + args.critic + (f"_at_{args.against}" if args.against else ""))
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    train(["--model", base_dir, "--data_dir", new_dir, "--output_dir", out, "--lr", "5e-4",
           "--epochs", str(args.epochs), "--warmup_steps", "10", "--val_size", str(args.held_out),
           "--eval_clips", str(args.eval_clips), "--keep_checkpoints", str(args.epochs)]
          + critic_flags(args, base_dir) + common_flags(args) + args.train_flags.split(),
          "fine-tune", args.threads, tree_at(args.against) if args.against else ROOT)
    minutes = (time.time() - start) / 60
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        for record in map(json.loads, f):
            if "eval_mcd" in record:
                new = {k[len("eval_"):]: v for k, v in record.items() if k.startswith("eval_")}
                # The old voice's held-out clips, as the voice of that epoch's checkpoint speaks them (forgetting).
                checkpoint = os.path.join(out, "checkpoints", f"checkpoint_epoch_{record['epoch']}.pt")
                old = checkpoint_quality(trainer, checkpoint, old_val, args.eval_clips)
                rows[record["epoch"]] = dict(step=record["step"], new=dict(val_mel=record["val_mel"], **new), old=old)
    return rows, minutes


def voices_apart(new_val, old_val):
    """MCD-DTW and duration ratio of the new voice's recordings against the old voice's, same sentences."""
    pairs = [voice_quality.compare_to_recording(n.astype(np.float32) / 32768.0, o.astype(np.float32) / 32768.0, SAMPLING_RATE)
             for n, o in zip(new_val.audio, old_val.audio)]
    return float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))


# ----------------------------------------------------------------------------------------------------
# --case speakers: the two voices as two speakers of one data set, pooled vs one id per speaker

SPEAKER_IDS = {"old": "espeak-ku-165-45", "new": "espeak-ku+f2-125-75"}  # as Common Voice client_ids


def two_speaker_data(out_dir, voice_dirs, held_out):
    """One prepared folder holding the training clips of both voices (never their held-out sentences),
    with speakers.csv naming each clip's voice as prepare_data.py names Common Voice speakers."""
    if os.path.isfile(os.path.join(out_dir, speech.SPEAKERS_FILE)):
        return out_dir
    os.makedirs(os.path.join(out_dir, "wavs"), exist_ok=True)
    rows, labels = [], []
    for voice, data_dir in voice_dirs.items():
        entries = speech.read_metadata(os.path.join(data_dir, "metadata.csv"))
        names = [name for name, _ in entries]
        held = {names[i] for i in clip_data.held_out_indices(names, held_out)}
        for name, text in entries:
            if name not in held:
                shutil.copy(os.path.join(data_dir, "wavs", name), os.path.join(out_dir, "wavs", f"{voice}_{name}"))
                rows.append((f"{voice}_{name}", text))
                labels.append((f"{voice}_{name}", SPEAKER_IDS[voice]))
    speech.write_speaker_labels(os.path.join(out_dir, speech.SPEAKERS_FILE), labels)
    speech.write_metadata(os.path.join(out_dir, "metadata.csv"), rows)
    return out_dir


def speaker_quality(model_dir, held_out_sets, n_clips):
    """{(speaker, voice): (MCD-DTW, duration ratio)} of each voice's held-out clips spoken by each speaker of
    the model, the speaker named by the voice it was trained on (None: a single voice)."""
    model, _ = models.load_voice(model_dir)
    table = speakers.read_table(model_dir)
    ids = {None: None} if not table else {
        voice: next(row["id"] for row in table if SPEAKER_IDS[voice].startswith(row["client_id"]))
        for voice in held_out_sets}
    scores = {}
    for speaker, k in ids.items():
        for voice, clipset in held_out_sets.items():
            result = voice_quality.evaluate_quality(model, clipset.with_speaker(k), n_clips)
            scores[(speaker, voice)] = (result["mcd"], result["dur_ratio"])
    return scores


def speakers_case(args, base_dir, voice_dirs):
    """The same steps from the same base on the same clips, as one pooled voice and as a 2-speaker voice."""
    data = two_speaker_data(os.path.join(args.data_dir, f"two_speakers_{args.clips}"), voice_dirs, args.held_out)
    held_out_sets = {voice: held_out_clips(d, base_dir, args.held_out) for voice, d in voice_dirs.items()}
    results = {"base": speaker_quality(base_dir, held_out_sets, args.eval_clips)}
    for choice in ("pooled", "2"):
        out = os.path.join(args.data_dir, f"fine_tune_speakers_{choice}")
        shutil.rmtree(out, ignore_errors=True)
        start = time.time()
        train(["--model", base_dir, "--data_dir", data, "--output_dir", out, "--lr", "5e-4", "--speakers", choice,
               "--epochs", str(args.epochs), "--warmup_steps", "10", "--val_size", str(args.held_out),
               "--eval_clips", "0", "--seed", "1234"] + critic_flags(args, base_dir) + common_flags(args)
              + args.train_flags.split(), f"--speakers {choice} fine-tune", args.threads)
        print(f"--speakers {choice}: {args.epochs} epochs in {(time.time() - start) / 60:.1f} min")
        results[choice] = speaker_quality(os.path.join(out, "final_model"), held_out_sets, args.eval_clips)
    print(f"\nspeakers: MCD-DTW dB (duration ratio) of each voice's {args.eval_clips} held-out clips, "
          f"{args.epochs} epochs on {len(speech.read_metadata(os.path.join(data, 'metadata.csv')))} clips of both")
    print("| voice | recordings of | MCD dB | dur ratio |")
    print("|---|---|---:|---:|")
    rows = [(name, speaker, voice, mcd, ratio) for name, scores in results.items()
            for (speaker, voice), (mcd, ratio) in sorted(scores.items(), key=lambda kv: str(kv[0]))]
    for name, speaker, voice, mcd, ratio in rows:
        who = {"base": "base voice", "pooled": "pooled fine-tune"}.get(name) or f"2-speaker, speaker {speaker}"
        print(f"| {who} | {voice} ({'/'.join(map(str, dict(old=OLD_VOICE, new=NEW_VOICE)[voice]))}) "
              f"| {mcd:.2f} | {ratio:.2f} |")
    for name, speaker, voice, mcd, ratio in rows:
        print(f"quality: speakers {name} speaker {speaker} voice {voice} mcd {mcd:.4f} dur_ratio {ratio:.4f}")
    return results


# ----------------------------------------------------------------------------------------------------
# Report

COLUMNS = [("mcd", "MCD dB", "{:.2f}"), ("dur_ratio", "dur ratio", "{:.2f}"), ("dur_ratio_std", "± std", "{:.2f}"),
           ("dnsmos_ovrl", "DNSMOS", "{:.2f}"), ("val_mel", "val mel", "{:.3f}")]


def print_table(rows):
    header = ["epoch", "step"] + [f"{voice} {title}" for voice in ("new", "old") for _, title, _ in COLUMNS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    for epoch, row in sorted(rows.items()):
        cells = [str(epoch), str(row["step"])] + [fmt.format(row[voice][key]) for voice in ("new", "old")
                                                  for key, _, fmt in COLUMNS]
        print("| " + " | ".join(cells) + " |")
    for epoch, row in sorted(rows.items()):
        print(f"quality: epoch {epoch} step {row['step']} " + " ".join(
            f"{voice}_{key} {row[voice][key]:.4f}" for voice in ("new", "old") for key, _, _ in COLUMNS))


def plot(rows, path, apart):
    try:
        import matplotlib
    except ImportError:
        sys.exit("the plot needs matplotlib: pip install -r benchmarks/requirements.txt")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = sorted(rows)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, title, _) in zip(axes, [COLUMNS[0], COLUMNS[1], COLUMNS[3], COLUMNS[4]]):
        for voice, style in (("new", "o-"), ("old", "s--")):
            ax.plot(epochs, [rows[e][voice][key] for e in epochs], style, label=f"{voice} voice (held out)")
        if key == "dur_ratio":
            ax.axhline(1.0, color="grey", lw=0.8)
        if key == "mcd":
            ax.axhline(apart, color="grey", lw=0.8, ls=":", label="old vs new recordings")
        ax.set_title(title)
        ax.set_xlabel("fine-tune epoch (0 = base)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Tiny model, few clips and steps: a smoke run.")
    p.add_argument("--data_dir", default=os.path.join(DATA_DIR, "quality"),
                   help="Voices, base models (cached) and the fine-tune run.")
    p.add_argument("--clips", type=int, default=None, help="Clips per voice (default by size).")
    p.add_argument("--base_steps", type=int, default=None, help="Training steps of the base voice (default by size).")
    p.add_argument("--epochs", type=int, default=None, help="Fine-tune epochs (default by size).")
    p.add_argument("--eval_clips", type=int, default=None, help="Held-out clips measured per voice (default by size).")
    p.add_argument("--plot", default=None, help="PNG path (default DATA_DIR/quality_<size>.png).")
    p.add_argument("--critic", choices=["pretrained", "fresh"], default="pretrained",
                   help="The fine-tune's critic: the base voice's own, or a fresh one trained alone for "
                        "--d_warmup_steps first.")
    p.add_argument("--d_warmup_steps", type=int, default=50, help="Solo steps of a fresh critic.")
    p.add_argument("--against", metavar="COMMIT", default=None,
                   help="Fine-tune with train_vits.py as it was at this git commit (its whole tree exported): "
                        "the same base voice, data, steps and seed, another recipe.")
    p.add_argument("--train_flags", default="", help="More train_vits.py flags for the fine-tune, e.g. '--d_lr 1e-4'.")
    p.add_argument("--threads", type=int, default=1,
                   help="Torch threads: 1 is fastest on a busy 2-core machine (README, Performance).")
    p.add_argument("--case", choices=["fine_tune", "speakers"], default="fine_tune",
                   help="fine_tune: the base voice tuned to the new voice, epoch by epoch; speakers: both voices "
                        "as two speakers of one data set, tuned as one pooled voice and as a 2-speaker voice "
                        "(train_vits.py --speakers 2), each voice's held-out clips measured against each.")
    args = p.parse_args(argv)
    size = "tiny" if args.quick else "small"
    for key, value in SIZES[size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)

    old_dir = make_voice_data(os.path.join(args.data_dir, f"voice_old_{args.clips}"), OLD_VOICE, args.clips,
                              args.held_out)
    new_dir = make_voice_data(os.path.join(args.data_dir, f"voice_new_{args.clips}"), NEW_VOICE, args.clips,
                              args.held_out)
    init_dir = init_model(os.path.join(args.data_dir, f"init_{size}"), size)
    base_dir = train_base(args, size, init_dir, old_dir)
    if args.case == "speakers":
        return speakers_case(args, base_dir, dict(old=old_dir, new=new_dir))
    old_val = held_out_clips(old_dir, base_dir, args.held_out)
    rows, minutes = fine_tune(args, base_dir, new_dir, old_val)
    apart = voices_apart(held_out_clips(new_dir, base_dir, args.held_out), old_val)

    print(f"\nfine-tune: {args.epochs} epochs on {args.clips} clips of {NEW_VOICE} in {minutes:.1f} min; "
          f"held out: {args.held_out} sentences per voice, {args.eval_clips} measured")
    print_table(rows)
    first, last = rows[0], rows[max(rows)]
    print(f"quality: voices apart mcd {apart[0]:.4f} dur_ratio {apart[1]:.4f}")
    print(f"quality: new voice mcd {first['new']['mcd']:.2f} -> {last['new']['mcd']:.2f}, dur_ratio "
          f"{first['new']['dur_ratio']:.2f} -> {last['new']['dur_ratio']:.2f}; old voice mcd "
          f"{first['old']['mcd']:.2f} -> {last['old']['mcd']:.2f}")
    plot(rows, args.plot or os.path.join(DATA_DIR, f"quality_{size}.png"), apart[0])
    return rows


if __name__ == "__main__":
    main()
