"""Improve a trained VITS voice in minutes from listening-session recordings, without forgetting the rest.

After train_vits.py, native speakers listen to the voice, note the sentences it says badly and record how
they should sound. This script fine-tunes the voice on those feedback clips, replaying clips of the
original training set in every batch (--replay_ratio) so the few clips do not drag the voice away from
everything else it learned. The input model is never written to: the tuned voice goes to a new folder
with its discriminator, report.json (validation mel loss on held-out original and feedback clips,
before and after, and the verdict: keep or reject) and listening samples of every feedback sentence,
before and after, side by side. --promote puts a kept tune to use as <data_dir>/voice.

It trains with the same modules as train_vits.py (step, preload, AMP, checkpoints, resume, time budget)
and takes its training flags, meaning the same; not --speakers, --min_speaker_clips or --speaker_lr.

Examples:

    # 1. a listening-session kit: the current voice speaks each line of a UTF-8 file, sNNN.txt holds what to record
    python train_feedback.py --make_session examples/sentences.txt   # -> training/sessions/<date>/

    # or the same in a local web page: hear each sentence, mark it, record corrections straight into
    # training/feedback (open the printed http://127.0.0.1:8000/ address; --listen alone continues)
    python train_feedback.py --listen examples/sentences.txt

    # 2. after recording corrections into training/feedback (NAME.wav + NAME.txt pairs, as a recording
    #    app saves them, or any audio + metadata.csv of filename|text rows, which wins when both exist):
    python train_feedback.py                                         # 30 minutes, new folder under
                                                                     # training/feedback_models/
    python train_feedback.py --feedback_dir training/sessions/2026-11-25 --target_minutes 10

    # 3. the run ends with its verdict (keep or reject, and why, judged on clips it never trained on);
    #    a kept tune becomes the current voice, training/voice (the one before it kept in training/voices/)
    python train_feedback.py --promote training/feedback_models/20261125-210000
    python train_feedback.py --rollback                              # the previous voice again, exactly

    # continue an interrupted feedback run (the newest one under training/feedback_models/)
    python train_feedback.py --resume auto

    # a tiny CPU smoke run: train_vits.py's tiny run, then NAME.wav + NAME.txt pairs in example_run/feedback
    python train_feedback.py --model example_run/final_model --data_dir example_run/data \\
        --feedback_dir example_run/feedback --output_dir example_run/feedback_run --max_steps 4 \\
        --device cpu --batch_size 2 --grad_accum 1 --feedback_weight 1 --disc_channels 64
"""

import argparse
import math
import os
import sys

from voicetune.feedback import blind_compare
from voicetune.night import checkpoints
from voicetune.common import distributed
from voicetune.feedback import feedback_run
from voicetune.feedback import listening
from voicetune.night import loop
from voicetune.feedback import page_server
from voicetune.voice import models
from voicetune.night import planning
from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.night import run_report
from voicetune.voice import speakers
from voicetune.common import speech
from voicetune.night import training_flags
from voicetune.feedback import verdict
from voicetune.night import vits_trainer
from voicetune.voice import voice_quality
from voicetune.voice import voices

FEEDBACK_MODELS_DIR = os.path.join("training", "feedback_models")
SESSIONS_DIR = os.path.join("training", "sessions")


# ----------------------------------------------------------------------------------------------------
# Flags: train_vits.py's parser with defaults for a short fine-tune, plus the feedback flags.

def build_parser():
    p = training_flags.build_parser(__doc__)
    p.set_defaults(model=None, lr=1e-5, warmup_steps=20, output_dir=None,
                   target_hours=None, val_size=100, benchmark_samples=50)
    g = p.add_argument_group("feedback")
    g.add_argument("--feedback_dir", default=feedback_run.DEFAULT_FEEDBACK_DIR,
                   help="Folder with the recorded clips (WAV, FLAC, OGG, MP3; any rate, mono or stereo), each "
                        "with its text: NAME.wav + NAME.txt, or a metadata.csv of filename|text rows (which wins "
                        "when both exist). (default: %(default)s)")
    g.add_argument("--replay_ratio", type=float, default=0.5,
                   help="Share of every batch taken from the original training set (--data_dir), so the voice "
                        "does not forget it; 0 trains on feedback alone. (default: %(default)s)")
    g.add_argument("--feedback_weight", type=float, default=50.0,
                   help="Times each feedback clip is used per epoch, where each replayed clip is used at most "
                        "once: how much more a feedback clip counts than a replayed one. Also sets the epoch "
                        "length: clips x weight / (1 - replay_ratio) items. (default: %(default)s)")
    g.add_argument("--target_minutes", type=float, default=None,
                   help="Wall-clock budget of the whole run in minutes, samples and report included; "
                        "replaces --target_hours. (default: 30)")
    g.add_argument("--speaker_id", type=int, default=None, metavar="ID",
                   help="For a multi-speaker voice (train_vits.py --speakers): whose voice the feedback clips "
                        "train and the samples, the session kit and the listening page speak with; replayed clips "
                        "keep their own speakers, and the tuned voice keeps them all. Ids and their Common Voice "
                        "client_ids are in speakers.json beside --model. (default: the speaker with the most "
                        "clips)")
    g.add_argument("--make_session", default=None, metavar="SENTENCES.txt",
                   help="Only make a listening-session kit: speak each sentence of the file (UTF-8 text, one a "
                        "line, as examples/sentences.txt) with --model into --output_dir (default "
                        "training/sessions/<date>/) with sNNN.txt, the text of each, then exit.")
    g = p.add_argument_group("blind comparison")
    g.add_argument("--compare", default=None, metavar="RUN_DIR",
                   help="Only serve a blind A/B listening test of the feedback run in RUN_DIR: each sentence (its "
                        "held-out feedback clips, the sentences marked in the listening session its feedback came "
                        "from, the evaluation sentences) spoken by the input voice and the tuned voice as A and B "
                        "in a random order; which is which is shown once every pair is judged. The result goes "
                        "into RUN_DIR/report.json and the verdict. Served like --listen (--host, --port, "
                        "--allow_remote); running it again continues.")
    g = p.add_argument_group("listening session")
    g.add_argument("--listen", nargs="?", const="", default=None, metavar="SENTENCES.txt|SESSION",
                   help="Only serve the listening-session page: hear --model say each sentence, mark it, record "
                        "corrections into --feedback_dir. A sentence file (UTF-8, one a line: examples/sentences.txt) "
                        "starts a new session; a kit or session folder continues it; no value: the newest session.")
    page_server.add_address_flags(g)
    g = p.add_argument_group("verdict (on held-out clips only: the tune is kept only if it is better)")
    g.add_argument("--max_worse_mel", type=float, default=verdict.TOLERANCES["max_worse_mel"],
                   help="How much worse the held-out original clips' mel L1 may get, as a share (0.03: 3%%), by "
                        "its mean or by a sure majority of clips, before the verdict is reject.")
    g.add_argument("--max_worse_mcd", type=float, default=verdict.TOLERANCES["max_worse_mcd"],
                   help="The same for their MCD-DTW (needs --eval_clips).")
    g.add_argument("--max_dur_drift", type=float, default=verdict.TOLERANCES["max_dur_drift"],
                   help="How much further from 1 their duration ratio (spoken / recorded) may move.")
    g.add_argument("--max_worse_cer", type=float, default=verdict.TOLERANCES["max_worse_cer"],
                   help="With --asr_model: how much the character error rate of the held-out and evaluation "
                        "sentences may rise (0.02: 2 points).")
    g.add_argument("--min_held_out", type=int, default=verdict.TOLERANCES["min_held_out"],
                   help="Fewest held-out clips a guard needs to judge; with fewer the verdict is reject and says "
                        "so.")
    g = p.add_argument_group("the voice in use (<data_dir>/voice, its versions in <data_dir>/voices)")
    g.add_argument("--promote", default=None, metavar="RUN_DIR",
                   help="Only make RUN_DIR/final_model the current voice, <data_dir>/voice (atomically; the one it "
                        "replaces is kept in <data_dir>/voices/NNN, the history in <data_dir>/voices.json), then "
                        "exit. A run whose verdict is reject is refused with its reasons.")
    g.add_argument("--rollback", action="store_true",
                   help="Only make the version the current voice replaced current again (the same files), then "
                        "exit.")
    g.add_argument("--force", action="store_true",
                   help="With --promote: promote a run the verdict rejected (recorded in voices.json).")
    # The new run folder is only decided after parsing (a timestamp, or the run --resume names).
    for action in p._actions:
        if action.dest == "output_dir":
            action.help = ("Where the tuned model, report.json, samples/ and checkpoints/ go; never inside "
                           "--model. (default: a new folder training/feedback_models/<date-time>)")
        elif action.dest == "target_hours":
            action.help = "Wall-clock budget in hours, instead of --target_minutes."
        elif action.dest == "model":
            action.help = ("The trained voice to improve (a folder, or a Hub name); it is only read. (default: "
                           "the current voice, <data_dir>/voice once a run was promoted, else "
                           "<data_dir>/final_model)")
    return p


def check_listen_args(parser, args):
    """--listen's source (a sentence file, a session folder, or the newest session) and a safe address."""
    if args.listen == "":
        args.listen = listening.newest_session(SESSIONS_DIR)
        if args.listen is None:
            parser.error(f"--listen: no session under {SESSIONS_DIR} to continue (give a sentence file)")
    elif not os.path.exists(args.listen):
        parser.error(f"--listen: no sentence file or session folder at {args.listen}")
    if os.path.isdir(args.listen):
        args.output_dir = args.listen
    page_server.check_address_args(parser, args)


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.target_minutes is not None and args.target_hours is not None:
        parser.error("give --target_minutes or --target_hours, not both")
    if args.target_minutes is not None:
        if not (math.isfinite(args.target_minutes) and args.target_minutes > 0):
            parser.error(f"--target_minutes must be positive, got {args.target_minutes}")
        args.target_hours = args.target_minutes / 60
    elif args.target_hours is None:
        args.target_hours = 0.5
    if args.promote is not None or args.rollback:
        if args.listen is not None or args.make_session or args.compare is not None or \
                (args.promote is not None and args.rollback):
            parser.error("--promote, --rollback, --compare, --listen and --make_session are separate jobs: give one")
        if args.promote is not None and not os.path.isdir(args.promote):
            parser.error(f"--promote: no run folder at {args.promote}")
        return args
    if args.force:
        parser.error("--force goes with --promote")
    for name in ("max_worse_mel", "max_worse_mcd", "max_dur_drift", "max_worse_cer"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            parser.error(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.min_held_out < 1:
        parser.error(f"--min_held_out must be at least 1, got {args.min_held_out}")
    if args.compare is not None:
        if args.listen is not None or args.make_session:
            parser.error("--compare serves a page of its own: give it without --listen or --make_session")
        if not os.path.isdir(args.compare):
            parser.error(f"--compare: no run folder at {args.compare}")
        args.output_dir = args.compare
        page_server.check_address_args(parser, args)
        training_flags.check_args(parser, args)
        return args  # both voices come from the run's own report.json
    if args.model is None:
        try:
            args.model = str(voices.current_voice(args.data_dir))
        except run_errors.TrainingError as err:
            parser.error(str(err))
    if not 0 <= args.replay_ratio < 1:
        parser.error(f"--replay_ratio must be at least 0 and below 1 (1 would leave no room for feedback), "
                     f"got {args.replay_ratio}")
    if not (math.isfinite(args.feedback_weight) and args.feedback_weight > 0):
        parser.error(f"--feedback_weight must be positive, got {args.feedback_weight}")
    if args.make_session and not os.path.isfile(args.make_session):
        parser.error(f"--make_session: no sentence file at {args.make_session}")
    if args.listen is not None:
        if args.make_session:
            parser.error("give --make_session or --listen, not both (--listen makes the kit itself)")
        check_listen_args(parser, args)
    if args.output_dir is None:
        if args.make_session or args.listen:
            args.output_dir = run_folder.new_run_dir(SESSIONS_DIR, "%Y-%m-%d")
        elif args.resume == "auto":
            args.output_dir = run_folder.newest_run_dir(FEEDBACK_MODELS_DIR)
            if args.output_dir is None:
                parser.error(f"--resume auto: no feedback run with a checkpoint under {FEEDBACK_MODELS_DIR} "
                             "(pass --output_dir)")
        elif args.resume:
            # .../<run>/checkpoints/checkpoint_epoch_N.pt continues in <run>
            args.output_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        else:
            args.output_dir = run_folder.new_run_dir(FEEDBACK_MODELS_DIR)
    # The model that already works must never be overwritten: fit() writes final_model/, checkpoints/,
    # samples/ and a cache under output_dir, so the two folders may not overlap either way.
    if os.path.isdir(args.model) and run_folder.overlap(args.output_dir, args.model):
        parser.error(f"--output_dir {args.output_dir} overlaps --model {args.model}: the input model is never "
                     "written to; choose a new folder (the default is a new one under training/feedback_models)")
    training_flags.check_args(parser, args)
    return args


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    budget = planning.Budget(args.target_hours * 3600)
    lock = None
    try:
        if args.listen is not None:
            listening.listen(args)
            return 0
        if args.compare is not None:
            blind_compare.serve(args.compare, args, SESSIONS_DIR)
            return 0
        if args.promote is not None:
            voices.promote(args.promote, args.data_dir, args.force)
            return 0
        if args.rollback:
            voices.rollback(args.data_dir)
            return 0
        lock = run_files.claim_output_dir(args, "train_feedback")
        if args.make_session:
            listening.make_session(args)
            return 0
        # 1. Machine and precision; under torchrun every rank takes the new folder rank 0 named.
        device, precision = vits_trainer.set_up_machine(args)
        args = argparse.Namespace(**dict(vars(args), output_dir=distributed.broadcast_object(args.output_dir)))
        os.makedirs(args.output_dir, exist_ok=True)

        # 2. The trained voice and its critic (read only: the tuned copy goes to output_dir).
        resume = checkpoints.resume_state(args)
        model, tokenizer = models.load_voice(args.model)
        _, vocab = speech.load_vocab(args.model)
        models.prepare_for_training(model)
        disc, disc_path = models.critic_for_run(args, resume)
        speaker_table = speakers.read_table(args.model)
        speaker = speakers.feedback_speaker(model.config, speaker_table, args.speaker_id)
        if speaker is not None:
            print(f"speaker: the feedback trains speaker {speaker} of {model.config.num_speakers}")

        # 3. Feedback clips, and the original training set to replay.
        sets = feedback_run.load_sets(args, tokenizer, vocab, model, speaker_table, speaker)

        # 4. Trainer and batches; the feedback set first, so fit() keeps the best model by it.
        trainer = vits_trainer.VitsTrainer(model, disc, args, device, precision,
                                           vits_trainer.critic_learning_rate(args, fresh=disc_path is None))
        if args.batch_size == "auto":
            # Tried on the longest clips the batches can hold: replayed originals may be longer than feedback.
            args = planning.with_batch(args, *planning.choose_batch_size(
                trainer, feedback_run.longest_source(sets, args.replay_ratio), args, resume[1]))
        make_batches = feedback_run.mixed_batches(sets.fb_train, sets.orig_train, args.batch_size, args.replay_ratio,
                                                  args.feedback_weight, args.seed)
        rank_batches = distributed.shard_batches(make_batches)  # this process's share under torchrun
        train_sets = feedback_run.epoch_views(make_batches)
        fit_val_sets = feedback_run.validation_sets(sets)
        eval_sentences = voice_quality.read_sentences(args.sample_sentences)
        feedback_run.save_run_info(args, disc_path, precision, device, sets)

        # 5. Before: listening samples and validation of the input voice (kept when resuming).
        report = run_files.read_report(args.output_dir) if args.resume else None
        if (report is None or "before" not in report) and distributed.is_main_process():
            report = feedback_run.measure_before(trainer, tokenizer, sets, eval_sentences, args, speaker, disc_path)
        report = distributed.broadcast_object(report)  # the other ranks wait for it
        # The same work is done again after training: keep time for it.
        budget.keep_back(1.5 * report["before_seconds"] + 5)

        # 6. Plan (or resume), then train with the loop train_vits.py trains with.
        run, data_key = loop.start_run(trainer, train_sets, rank_batches, fit_val_sets, args, budget,
                                       default_d_warmup=0 if disc_path else 50, resume=resume,
                                       fixed_flags=feedback_run.RESUME_FIXED)
        del resume  # its tensors are the trainer's now
        reason = loop.fit(trainer, tokenizer, train_sets, rank_batches, fit_val_sets, args, budget, run, data_key,
                          speaker_table)
        if reason == "interrupted":
            return 130
        if not distributed.is_main_process():
            return 0

        # 7. After: the same samples and validation with the tuned voice, and the report.
        feedback_run.measure_after(report, trainer, tokenizer, sets, eval_sentences, args, speaker, reason,
                                   round(budget.used() / 60, 2),
                                   feedback_run.items_per_epoch(make_batches, sets.fb_train))
        if args.asr_model:
            report["intelligibility"] = feedback_run.intelligibility(sets, eval_sentences, args)

        # 8. The verdict, on held-out clips only: keep the tune, or reject it and say why.
        report["verdict"] = verdict.decide(report, **{k: getattr(args, k) for k in verdict.TOLERANCES})
        run_files.write_report(args.output_dir, report)
        run_report.update(args.output_dir)
        feedback_run.print_report(report, os.path.join(args.output_dir, run_files.REPORT))
        verdict.print_verdict(report["verdict"])
        print(f"put it to use with: {run_files.promote_command(args.output_dir, args.data_dir)}"
              + (" (refused unless --force: the verdict is reject)" if report["verdict"]["decision"] == "reject"
                 else ""))
    except (run_errors.TrainingError, OSError, KeyboardInterrupt) as err:
        return run_errors.report_fatal(err, args.output_dir)
    finally:
        if lock:
            lock.release()
        distributed.leave_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
