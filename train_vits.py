"""Fine-tune a VITS voice (MMS by default) overnight on one GPU, within a wall-clock budget.

`transformers`' VitsModel only synthesises, so the training step is ours, as in the original VITS:
posterior encoder on the linear spectrogram, flow, monotonic alignment search, KL, stochastic duration
loss, mel L1 on decoded slices, and HiFi-GAN multi-period + scale discriminators.

Examples:

    # the real job: MMS Kurmanji on the output of prepare_data.py, sized to 9.5 hours
    python train_vits.py --data_dir training --output_dir training

    # a voice of the 3 Common Voice speakers with the most clips (speaker ids 0-2, named in speakers.json)
    python train_vits.py --data_dir training --output_dir training --speakers 3

    # continue an interrupted run with the budget it had left
    python train_vits.py --resume auto

    # several GPUs of one machine (DistributedDataParallel; --batch_size is per GPU)
    torchrun --standalone --nproc_per_node 4 train_vits.py --data_dir training --output_dir training

    # a tiny CPU smoke run (see examples/tiny_model.py and demo.sh)
    python train_vits.py --model example_run/tiny_model --data_dir example_run \\
        --output_dir example_run --target_hours 0.03 --device cpu --batch_size 4 --grad_accum 1
"""

import os
import sys

# The flags load no torch, so --help and every refusal answer at once; the training stack (seconds to
# import) is loaded once the flags are good.
from voicetune.night import training_flags


def parse_args(argv=None):
    return training_flags.parse(argv, __doc__)


def main(argv=None):
    args = parse_args(argv)
    from voicetune.night import loop
    return loop.run_held(args, "train_vits", lambda: train(args))


def train(args):
    """The night in numbered steps, in the output folder main holds; the exit code."""
    from voicetune.common import distributed
    from voicetune.common import run_errors
    from voicetune.night import checkpoints
    from voicetune.night import clip_data
    from voicetune.night import loop
    from voicetune.night import planning
    from voicetune.night import run_report
    from voicetune.night import vits_trainer
    from voicetune.voice import models
    from voicetune.voice import speakers

    budget = planning.Budget(args.target_hours * 3600)
    # 1. Machine and precision; the run to continue, if --resume names one.
    device, precision = vits_trainer.set_up_machine(args)
    resume = checkpoints.resume_state(args)
    # 2. The pretrained voice and its critic.
    model, tokenizer = models.load_voice(args.model)
    disc, disc_path = models.critic_for_run(args, resume)
    sr = model.config.sampling_rate
    # 3. Data, preloaded into RAM; with --speakers, whose clips train which speaker.
    clips, errors = clip_data.load_clips(args.data_dir, sr, os.path.join(args.output_dir, "cache"),
                                         args.num_workers, args.max_samples)
    clipset = clip_data.ClipSet(clips, tokenizer)
    for reason, count in clipset.dropped.items():
        print(f"dropped {count} clips: {reason}")
    clipset, speaker_table = speakers.choose_speakers(clipset, args.data_dir, args.speakers,
                                                      args.min_speaker_clips, sr)
    speaker_lr = speakers.speaker_learning_rate(args, model, speaker_table)
    model = models.prepare_for_training(speakers.with_speakers(model, len(speaker_table or [])))
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {sr} Hz, "
          f"{model.config.num_speakers} speaker(s); device {device}, precision {precision}")
    train_set, val_set = clip_data.split_validation(clipset, args.val_size)
    if len(train_set) == 0:
        raise run_errors.TrainingError(f"{args.data_dir}: no usable clips ({len(errors)} failed to load)")
    print(f"data: {len(train_set)} training clips, {len(val_set)} validation clips, "
          f"{len(errors)} skipped as unreadable")
    loop.save_run_info(args, dict(script="train_vits", precision=precision, device=str(device),
                                  discriminator=disc_path, train_clips=len(train_set), val_clips=len(val_set),
                                  skipped_clips=errors, dropped_clips=clipset.dropped, speakers=speaker_table))
    # 4. The batch, and the run to continue (--resume) or to plan.
    trainer = vits_trainer.VitsTrainer(model, disc, args, device, precision,
                                       vits_trainer.critic_learning_rate(args, fresh=disc_path is None), speaker_lr)
    if args.batch_size == "auto":
        args = planning.with_batch(args, *planning.choose_batch_size(trainer, train_set, args, resume[1]))
    make_batches = distributed.shard_batches(clip_data.epoch_batches(train_set, args.batch_size, args.seed))
    val_sets = {"val": val_set}
    run, data_key = loop.start_run(trainer, [train_set], make_batches, val_sets, args, budget,
                                   default_d_warmup=0 if disc_path else 200, resume=resume)
    del resume  # its tensors are the trainer's now
    # 5. Train.
    reason = loop.fit(trainer, tokenizer, [train_set], make_batches, val_sets, args, budget, run, data_key,
                      speaker_table)
    if distributed.is_main_process():
        run_report.print_next(args.output_dir)
    return 130 if reason == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
