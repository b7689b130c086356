"""The flags both trainers share: train_vits.py's parser, which train_feedback.py builds on, so a flag
means the same in both; and their checks."""

import argparse
import math
import os
import re

from voicetune.common import run_errors
from voicetune.common import speech

ASR_LANG = "kmr-script_latin"  # the voice's language, as MMS names it
AUTO_CPU_BATCH = 8  # --batch_size auto on a CPU, where a bigger micro-batch is no faster per sample


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's example layout and shows each flag's default, unless its help says it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def speakers_arg(text):
    """--speakers: 'pooled', 'all' or a number of speakers."""
    if text in ("pooled", "all"):
        return text
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not pooled, all or a number of speakers") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count}: a voice has at least 1 speaker")
    return count


def held_out_count(clips, val_size, at_least_one=False):
    """How many of `clips` --val_size holds out (clip_data.split_validation draws them): at most val_size
    and a tenth of the clips; at_least_one: one even below ten, once there are four (a feedback set is
    small and its verdict needs a held-out clip)."""
    return min(val_size, max(1, clips // 10) if at_least_one and clips >= 4 else clips // 10)


def batch_size_arg(text):
    return text if text == "auto" else int(text)


def build_parser(description):
    """All training flags; train_feedback.py builds on the same parser so its flags mean the same."""
    p = run_errors.FlagParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data_dir", default="training", help="Folder with wavs/ and metadata.csv (filename|text).")
    g.add_argument("--model", default="facebook/mms-tts-kmr-script_latin",
                   help="VitsModel to fine-tune: a Hugging Face name or a local folder.")
    g.add_argument("--discriminator", default="auto",
                   help="The critic to start from: a file (an original MMS/VITS D_*.pth, a finetune-hf-vits "
                        "checkpoint, .pth or .safetensors, with or without weight norm, or a discriminator.pt saved "
                        "by this script); 'none' for a fresh one; 'auto' (default): the discriminator.pt beside a "
                        "local --model folder, else for a Hub voice facebook/mms-tts-<lang> MMS's own critic "
                        "(facebook/mms-tts, full_models/<lang>/D_100000.pth, through the Hugging Face cache: "
                        "offline once cached), else a fresh one. A resumed run takes its critic from the checkpoint.")
    g.add_argument("--disc_channels", type=int, default=1024, choices=[64, 128, 256, 512, 1024],
                   help="Widest discriminator layer for a fresh discriminator: 1024 as VITS/MMS; smaller only "
                        "for quick trials with tiny models.")
    g.add_argument("--output_dir", default="training",
                   help="Where checkpoints/, final_model/, samples/, metrics.jsonl and the cache go.")
    g.add_argument("--max_samples", type=int, default=None, help="Use only the first N clips (quick trials).")
    g.add_argument("--val_size", type=int, default=100,
                   help="Held-out clips for validation (at most a tenth of the data).")
    g.add_argument("--sample_sentences", default=None,
                   help="Text file, one sentence a line, synthesised after every epoch (default: built in).")
    g = p.add_argument_group("budget")
    g.add_argument("--target_hours", type=float, default=9.5,
                   help="Wall-clock budget of the whole run, preload and saving included.")
    g.add_argument("--epochs", type=int, default=None, help="Train this many epochs instead of the planned number.")
    g.add_argument("--max_steps", type=int, default=None, help="Stop after this many optimizer steps.")
    g.add_argument("--benchmark_samples", type=int, default=200,
                   help="Samples of real training steps timed to plan the epochs (0: skip, guess from the first "
                        "epoch).")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=batch_size_arg, default="auto",
                   help="Clips per micro-batch, or 'auto': on one GPU the largest that fits with 10%% of its free "
                        f"memory to spare (tried with real steps on the longest clips), on a CPU or under torchrun "
                        f"{AUTO_CPU_BATCH}; auto keeps {AUTO_CPU_BATCH} x --grad_accum clips per "
                        "optimizer step by lowering --grad_accum. A resumed run keeps the batch it had.")
    g.add_argument("--grad_accum", type=int, default=4, help="Micro-batches per optimizer step.")
    g.add_argument("--lr", type=float, default=2e-5,
                   help="Peak learning rate of the generator, and of a pretrained discriminator.")
    g.add_argument("--d_lr", type=float, default=None,
                   help="Peak learning rate of the discriminator (default: for a fresh one 2e-4, VITS's rate "
                        "from scratch, or --lr if higher, at which it trains its --d_warmup_steps with no warm-up; "
                        "--lr for a pretrained one).")
    g.add_argument("--warmup_steps", type=int, default=500, help="Linear LR warm-up steps before the cosine decay.")
    g.add_argument("--d_warmup_steps", type=int, default=None,
                   help="Steps that train only the discriminator before it may push the generator "
                        "(default 200 for a fresh one, 0 for a pretrained one).")
    g.add_argument("--c_mel", type=float, default=45.0, help="Weight of the mel L1 loss.")
    g.add_argument("--c_kl", type=float, default=1.0, help="Weight of the KL loss.")
    g.add_argument("--grad_clip", type=float, default=100.0, help="Gradient-norm clip for both networks.")
    g.add_argument("--segment_frames", type=int, default=32,
                   help="Spectrogram frames of each decoded slice (32 x 256 = 8,192 samples in VITS).")
    g.add_argument("--max_bad_steps", type=int, default=20,
                   help="Stop the run after this many non-finite steps in a row.")
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (cuda when available).")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs that compute it natively (compute capability 8.0 and up), else fp16 "
                        "with a GradScaler (an RTX 20xx: Turing has no bf16 tensor cores); fp32 on CPU (fp16 runs "
                        "there too, slowly: a check of the fp16 path).")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the critic and the HiFi-GAN decoder (the convolutions, most of a step). "
                        "Off: it measured slower on a CPU and no faster on an H100 (README, Performance); the first "
                        "steps wait minutes for the compiler; on Windows it needs a C++ compiler, on a GPU Triton.")
    g.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                   help="Processes that decode clips during the preload.")
    g.add_argument("--seed", type=int, default=1234, help="Seed for shuffling, slicing and initialisation.")
    g = p.add_argument_group("saving and logging")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="'auto' (newest checkpoint in output_dir) or a checkpoint path.")
    g.add_argument("--overwrite", action="store_true",
                   help="Start a fresh run in an output_dir that holds an earlier one, deleting its checkpoints, "
                        "final_model/, samples/ and metrics (default: refuse, and say so).")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="Epoch checkpoints kept on disk.")
    g.add_argument("--logging_steps", type=int, default=20, help="Optimizer steps between metrics.jsonl lines.")
    g = p.add_argument_group("voice quality (every epoch, after validation)")
    g.add_argument("--eval_clips", type=int, default=16,
                   help="Held-out clips spoken from their text alone and compared with the recording (MCD-DTW, "
                        "duration ratio, DNSMOS); 0 turns this off.")
    g.add_argument("--best_metric", default="val_mel", choices=["val_mel", "mcd", "dnsmos"],
                   help="What checkpoints/best_model/ is best at: validation mel loss, MCD-DTW (both lowest) "
                        "or DNSMOS OVRL (highest).")
    g.add_argument("--asr_model", default=None,
                   help="CTC speech recogniser (Hugging Face name or local folder) that transcribes the listening "
                        "samples every epoch; their character error rate is logged as asr_cer (train_feedback.py: "
                        "and judges the tune's verdict). Off by default. The multilingual MMS recogniser works as "
                        "it is published: --asr_model facebook/mms-1b-all with --asr_lang.")
    g.add_argument("--asr_lang", default=ASR_LANG,
                   help="The language of a multilingual --asr_model (MMS: its adapter and vocabulary, as "
                        "target_lang chooses them); ignored by a recogniser of one language. (default: "
                        "%(default)s, the voice's language; '' keeps the model's own)")
    return p


def add_speaker_flags(p):
    """train_vits.py's choice of one pooled voice or one voice per speaker (train_feedback.py tunes the voice
    it is given, with all its speakers)."""
    g = p.add_argument_group("speakers")
    g.add_argument("--speakers", type=speakers_arg, default="pooled", metavar="pooled|N|all",
                   help="pooled (default): one voice learnt from every clip, as MMS's single voice is. N: a voice of "
                        "the N speakers with the most usable clips, each with its own speaker id (0 has the most "
                        "clips), every one starting as exactly the pretrained voice; all: every speaker with at "
                        "least --min_speaker_clips clips. Other speakers' clips are left out and counted. Needs "
                        "speakers.csv beside metadata.csv (prepare_data.py writes it from Common Voice's "
                        "client_id). prepare_data.py --speaker/--top_speakers choose whose clips are prepared at "
                        "all; this chooses whether they train one voice or several.")
    g.add_argument("--speaker_lr", type=float, default=None,
                   help="Peak learning rate of the speaker embeddings and conditioning layers a single-speaker "
                        "voice gains with --speakers (default: 10 x --lr, 2e-4 with the default --lr: VITS's "
                        "rate from scratch, for the parts that start from zero).")
    g.add_argument("--min_speaker_clips", type=int, default=50,
                   help="With --speakers all: the fewest usable clips a speaker needs to get an id (below about 50 "
                        "clips, a few minutes, a speaker's id learns little more than the pooled voice).")


def check_args(parser, args):
    missing = args.model and speech.missing_local_voice(args.model)
    if missing:
        parser.error(f"--model: {missing}")
    for name in ("batch_size", "grad_accum", "segment_frames", "keep_checkpoints", "logging_steps", "epochs",
                 "max_steps", "max_samples"):
        if getattr(args, name) not in (None, "auto") and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("d_lr", "speaker_lr"):  # optional rates (train_feedback.py has no --speaker_lr)
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{name} must be a positive number, got {value}")
    for name in ("target_hours", "lr", "grad_clip"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            parser.error(f"--{name} must be a positive number, got {getattr(args, name)}")
    for name in ("seed", "val_size"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        parser.error(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device}")
    if args.sample_sentences and not os.path.isfile(args.sample_sentences):
        parser.error(f"--sample_sentences: no file at {args.sample_sentences}")
    if args.resume and args.overwrite:
        parser.error("give --resume (continue the run in --output_dir) or --overwrite (start it over), not both")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        parser.error(f"--resume: no checkpoint file at {args.resume}")
    if args.discriminator not in ("auto", "none") and not os.path.isfile(args.discriminator):
        parser.error(f"--discriminator: no file at {args.discriminator} (or give auto or none)")
    if args.benchmark_samples <= 0 and not (args.epochs or args.max_steps):
        parser.error("--benchmark_samples 0 needs --epochs or --max_steps: without a benchmark there is no plan")
    if args.eval_clips < 0:
        parser.error(f"--eval_clips must be 0 or more, got {args.eval_clips}")
    if getattr(args, "min_speaker_clips", 1) < 1:
        parser.error(f"--min_speaker_clips must be at least 1, got {args.min_speaker_clips}")
    if args.best_metric != "val_mel" and args.eval_clips == 0:
        parser.error(f"--best_metric {args.best_metric} needs --eval_clips above 0")


def parse(argv=None, description=__doc__):
    """train_vits.py's flags from `argv`, checked: the command's own parse (with its docstring as the description),
    and what a library caller such as a benchmark gets."""
    parser = build_parser(description)
    add_speaker_flags(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args
