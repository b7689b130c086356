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
    python train_feedback.py --model example_run/final_model --data_dir example_run \\
        --feedback_dir example_run/feedback --output_dir example_run/feedback_run --max_steps 4 \\
        --device cpu --batch_size 2 --grad_accum 1 --feedback_weight 1 --disc_channels 64
"""

import argparse
import os
import sys

# Only what the flags, the refusals, --promote and --rollback need: none imports torch. The training stack
# (seconds to import) is loaded by the jobs that use it.
from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.feedback import feedback_flags
from voicetune.feedback import verdict
from voicetune.voice import voices


def parse_args(argv=None):
    return feedback_flags.parse(argv, __doc__)


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    try:
        # The jobs that only read or move a voice, or serve a page, end here, each one call.
        if args.promote is not None:
            voices.promote(args.promote, args.data_dir, args.force)
            return 0
        if args.rollback:
            voices.rollback(args.data_dir)
            return 0
        if args.listen is not None:
            from voicetune.feedback import listening
            listening.listen(args)
            return 0
        if args.compare is not None:
            from voicetune.feedback import blind_compare
            blind_compare.serve(args.compare, args, os.path.join(args.data_dir, run_files.SESSIONS))
            return 0
    except (run_errors.TrainingError, OSError, KeyboardInterrupt) as err:
        return run_errors.report_fatal(err, args.output_dir)
    from voicetune.night import loop
    return loop.run_held(args, "train_feedback", lambda: tune(args))


def tune(args):
    """A session kit, or the tune in numbered steps, in the output folder main holds; the exit code."""
    # The training stack, imported here so that the jobs above and every refusal load no torch.
    from voicetune.common import distributed
    from voicetune.common import speech
    from voicetune.feedback import feedback_run
    from voicetune.feedback import listening
    from voicetune.night import checkpoints
    from voicetune.night import loop
    from voicetune.night import planning
    from voicetune.night import run_report
    from voicetune.night import vits_trainer
    from voicetune.voice import models
    from voicetune.voice import speakers
    from voicetune.voice import voice_quality

    budget = planning.Budget(args.target_hours * 3600)
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
    print(f"hear it against {args.model}, blind, with: {run_files.compare_command(args.output_dir, args.data_dir)}")
    print(f"put it to use with: {run_files.promote_command(args.output_dir, args.data_dir)}"
          + (" (refused unless --force: the verdict is reject)" if report["verdict"]["decision"] == "reject"
             else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
