"""The training loop both trainers share: a fresh or resumed run, epochs inside the budget, Ctrl-C and
deadlines, checkpoints, validation, listening samples, the best and final models, metrics.jsonl."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import soundfile as sf
import torch
from tqdm.auto import tqdm

from voicetune.common import distributed
from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.night import checkpoints
from voicetune.night import clip_data
from voicetune.night import planning
from voicetune.night import run_report
from voicetune.voice import models
from voicetune.voice import voice_quality


class MetricsLog:
    """metrics.jsonl lines, plus TensorBoard scalars and audio when tensorboard is installed."""

    def __init__(self, output_dir):
        self.output_dir, self.tb = output_dir, None
        if not distributed.is_main_process():
            self.output_dir = None  # under torchrun only rank 0 logs
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(output_dir, run_files.TENSORBOARD))
        except ImportError:
            self.tb = None

    def write(self, record):
        if self.output_dir is None:
            return
        run_files.append_metrics(self.output_dir, record)
        if self.tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(key, value, record["step"])

    def audio(self, tag, paths, step):
        if self.tb:
            for path in paths:
                audio, sr = sf.read(path, dtype="float32")
                self.tb.add_audio(f"{tag}/{os.path.basename(path)}", audio, step, sample_rate=sr)

    def close(self):
        if self.tb:
            self.tb.close()


def format_terms(terms):
    return " | ".join(f"{k} {v:.3g}" for k, v in terms.items())


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to save a resumable checkpoint and exit; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        # Windows has no SIGTERM from other processes; Ctrl-C is SIGINT everywhere, Ctrl-Break SIGBREAK.
        for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
            if hasattr(signal, name):
                sig = getattr(signal, name)
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a resumable checkpoint, then exiting", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def vram_text(device):
    if device.type != "cuda":
        return ""
    return f"{torch.cuda.memory_allocated(device) / 2**30:.1f}/{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"


@dataclasses.dataclass
class Run:
    """Where a run is, as its checkpoints record it: its plan, the epoch it is in and the micro-batches of
    that epoch already trained, the best validation score so far, and its critic-only warm-up steps."""
    plan: planning.Plan
    epoch: int = 1
    batches_done: int = 0
    best: float | None = None
    d_warmup_steps: int = 0


def run_held(args, script, steps):
    """The head and tail both trainers share: args.output_dir held for the run (`run_files.claim_output_dir`), `steps()`,
    and however they end: a TrainingError, an OSError (a full disk) or Ctrl-C as one line and its exit code,
    the folder released and torchrun's group left. Returns steps()'s exit code."""
    lock = None
    # A run refused before it wrote anything (no feedback clips, ...) leaves no empty run folder behind.
    with run_folder.removed_if_left_empty(args.output_dir):
        try:
            lock = run_files.claim_output_dir(args, script)
            return steps()
        except (run_errors.TrainingError, OSError, KeyboardInterrupt) as err:
            return run_errors.report_fatal(err, args.output_dir)
        finally:
            if lock:
                lock.release()
            distributed.leave_distributed()


def start_run(trainer, train_sets, make_batches, val_sets, args, budget, default_d_warmup, resume,
              fixed_flags=checkpoints.RESUME_FIXED):
    """A fresh run (benchmark + plan) or the run of the checkpoint `resume` = (path, state) continues.

    fixed_flags: the flags a resumed run must keep (the caller's own, besides checkpoints.RESUME_FIXED).
    """
    data_key = checkpoints.data_fingerprint(train_sets, val_sets)
    longest = max(cs.frames(i) for cs in train_sets for i in range(len(cs)))
    if args.segment_frames > longest:
        raise run_errors.TrainingError(f"--segment_frames {args.segment_frames} is longer than the longest training "
                                       f"clip ({longest} frames): every slice would be padding; use at most {longest}")
    path, state = resume
    if path:
        checkpoints.load_checkpoint(path, state, trainer, args, data_key, fixed_flags)
        budget.used_before = state["budget_used"]
        print(f"resumed {path}: epoch {state['epoch']}, step {trainer.step}, "
              f"{budget.left() / 3600:.2f} h of budget left")
        run = Run(planning.resumed_plan(trainer, state, args), state["epoch"], state["batches_done"], state["best"],
                  state["d_warmup_steps"])
        if run.batches_done >= len(make_batches(run.epoch)):
            run.epoch, run.batches_done = run.epoch + 1, 0
    else:
        n_val = sum(len(cs) for cs in val_sets.values())
        d_warmup = default_d_warmup if args.d_warmup_steps is None else args.d_warmup_steps
        plan = planning.plan_run(trainer, train_sets, make_batches, n_val, args, budget, d_warmup)
        trainer.schedule(plan.total_steps, plan.d_warmup_steps)
        run = Run(plan, d_warmup_steps=plan.d_warmup_steps)
    # The plan in run_config.json: how many steps, and how many of them train the critic alone.
    add_run_info(args, dict(planned_steps=run.plan.total_steps, d_warmup_steps=run.d_warmup_steps,
                            d_warmup_steps_asked=max(run.plan.d_warmup_steps_asked, run.d_warmup_steps)))
    return run, data_key


def fit(trainer, tokenizer, train_sets, make_batches, val_sets, args, budget, run, data_key, speaker_table=None):
    """Train epoch by epoch inside the budget; checkpoint every epoch; keep best and final models.

    make_batches(epoch) -> list of micro-batches, each a list of (clipset, index) items; it must be
    deterministic for a given epoch so a resumed run continues with the same order.
    run: the Run start_run gives (fit moves it on as it trains).
    speaker_table: the speakers of a multi-speaker voice (speakers.json beside every exported model).
    Returns "done", "deadline", "max_steps" or "interrupted".
    """
    output_dir = args.output_dir
    ckpt_dir = os.path.join(output_dir, run_files.CHECKPOINTS)
    os.makedirs(ckpt_dir, exist_ok=True)
    for folder in (output_dir, ckpt_dir):
        run_folder.remove_stale_temps(folder)  # left by a run killed while saving
    log = MetricsLog(output_dir)
    sentences = voice_quality.read_sentences(args.sample_sentences)
    if args.asr_model and distributed.is_main_process():  # only rank 0 runs the end-of-epoch work
        # A wrong name or language fails now, not after the first epoch; the same (model, language) is
        # what the epochs transcribe with, so it is loaded once.
        voice_quality.load_asr(args.asr_model, args.asr_lang)
    plan = run.plan
    reason = "done"
    pace = planning.StepPace(trainer, plan, args, budget, run)

    def checkpoint(epoch, batches_done, tag=""):
        start = time.time()
        checkpoints.save_checkpoint(output_dir, tag, trainer, run, epoch, batches_done, budget.used(), args, data_key)
        budget.saved(time.time() - start)

    def progress(finished_epochs, ended=None):
        """progress.json and report.html (rank 0): the morning's page stands after every epoch."""
        if distributed.is_main_process():
            run_report.record_progress(output_dir, args, dataclasses.asdict(plan), finished_epochs, trainer.step,
                                       budget.used() / 3600, ended)

    progress(run.epoch - 1)

    with StopRequest() as stop:
        for epoch in range(run.epoch, plan.epochs + 1):
            batches = make_batches(epoch)
            skip = run.batches_done if epoch == run.epoch else 0
            windows = [batches[i:i + args.grad_accum] for i in range(skip, len(batches), args.grad_accum)]
            bar = tqdm(total=len(batches), initial=skip, desc=f"epoch {epoch}/{plan.epochs}", unit="batch",
                       disable=not distributed.is_main_process())
            done, samples, start, terms, interrupted = skip, 0, time.time(), {}, False
            for window in windows:
                # Agreed by all ranks, so they stop at the same step (a signal may reach only one).
                interrupted = distributed.any_rank(stop.requested)
                out_of_time = distributed.any_rank(budget.out_of_time())
                if interrupted or out_of_time or trainer.step >= plan.total_steps:
                    break
                began = time.time()
                tensors = [clip_data.collate(items, args.segment_frames) for items in window]
                result = trainer.train_window(tensors, d_only=trainer.step < run.d_warmup_steps)
                terms = result or terms  # a skipped (non-finite) step keeps showing the last good terms
                pace.stepped(time.time() - began)
                done += len(window)
                samples += sum(len(items) for items in window) * distributed.world_size()  # every rank trains as many
                rate = samples / (time.time() - start)
                epoch_eta = (len(batches) - done) * (time.time() - start) / max(1, done - skip)
                bar.set_postfix_str(f"{format_terms(terms)} | {rate:.1f} samples/s {vram_text(trainer.device)} "
                                    f"| eta {epoch_eta / 60:.0f}m, total {budget.left() / 60:.0f}m left")
                bar.update(len(window))
                if result and trainer.step % args.logging_steps == 0:
                    log.write(dict(step=trainer.step, epoch=epoch, **terms, lr=trainer.lr(), samples_per_s=rate,
                                   skipped_steps=trainer.skipped_steps, oom_splits=trainer.oom_splits))
            bar.close()
            if done < len(batches):
                if interrupted:
                    checkpoint(epoch, done, "_interrupted")
                    reason = "interrupted"
                    break
                reason = stop_reason(trainer, plan, args)
                checkpoint(epoch, done, "_partial")
                break
            run.epoch, run.batches_done = epoch + 1, 0
            train_seconds = time.time() - start
            if distributed.is_main_process() and budget.end_of_epoch_fits():
                began = budget.used()
                try:
                    end_of_epoch(trainer, tokenizer, val_sets, sentences, epoch, args, run, log, speaker_table)
                except torch.OutOfMemoryError:
                    trainer.free_gpu_memory()
                    tqdm.write(f"epoch {epoch}: out of GPU memory in validation or the listening samples: skipped "
                               "this time, the training goes on")
                budget.end_of_epoch_seconds = budget.used() - began
            distributed.barrier()  # the other ranks wait for rank 0's validation and samples
            print(f"epoch {epoch}: {len(batches) - skip} batches in {train_seconds / 60:.1f} min, "
                  f"step {trainer.step}, {trainer.skipped_steps} non-finite steps skipped so far")
            checkpoint(epoch, len(batches))
            progress(epoch)
            if trainer.step >= plan.total_steps:
                reason = stop_reason(trainer, plan, args)
                break
    if reason != "interrupted" and distributed.is_main_process():
        try:
            models.export_voice(trainer.model, tokenizer, trainer.disc, os.path.join(output_dir, run_files.FINAL_MODEL),
                                speaker_table)
        except torch.OutOfMemoryError:
            # Never lose the final model to the GPU: write it from the CPU.
            trainer.free_gpu_memory()
            models.export_voice(trainer.model.cpu(), tokenizer, trainer.disc.cpu(),
                                os.path.join(output_dir, run_files.FINAL_MODEL), speaker_table)
        print(f"final model: {os.path.join(output_dir, run_files.FINAL_MODEL)} ({reason}, step {trainer.step}, "
              f"{budget.used() / 3600:.2f} h used)")
    progress(run.epoch - 1, reason)
    log.close()
    # torchrun stops every process once one exits with an error code (130 after Ctrl-C): none leaves
    # before rank 0 has saved.
    distributed.barrier()
    return reason


def stop_reason(trainer, plan, args):
    """Why a run stops before the end of its epochs: --max_steps, its planned steps done, or the deadline."""
    if args.max_steps and trainer.step >= args.max_steps:
        return "max_steps"
    return "done" if trainer.step >= plan.total_steps else "deadline"


SAMPLE_SPEAKERS = 3  # a multi-speaker voice's listening samples: its speakers with the most clips


def end_of_epoch(trainer, tokenizer, val_sets, sentences, epoch, args, run, log, speaker_table=None):
    """Validation, voice quality, listening samples (transcribed with --asr_model), best model."""
    scores = {name: trainer.evaluate(cs, args.batch_size) for name, cs in val_sets.items() if len(cs)}
    record = dict(step=trainer.step, epoch=epoch)
    for name, terms in scores.items():
        record.update({f"{name}_{k}": v for k, v in terms.items()})
        if args.eval_clips:
            quality = voice_quality.evaluate_quality(trainer.model, val_sets[name], args.eval_clips)
            record.update({run_files.metric_key(name, k): v for k, v in quality.items()})
    samples_dir = os.path.join(args.output_dir, run_files.SAMPLES, run_files.epoch_samples(epoch))
    if speaker_table:
        paths = []
        for row in speaker_table[:SAMPLE_SPEAKERS]:
            spoken = voice_quality.synthesise(trainer.model, tokenizer, sentences,
                                              os.path.join(samples_dir, run_files.speaker_samples(row["id"])),
                                              speaker_id=row["id"])
            log.audio(f"epoch_{epoch}/{run_files.speaker_samples(row['id'])}", spoken, trainer.step)
            paths += spoken
    else:
        paths = voice_quality.synthesise(trainer.model, tokenizer, sentences, samples_dir)
        log.audio(f"epoch_{epoch}", paths, trainer.step)
    if args.asr_model:
        heard = voice_quality.transcribe(paths, args.asr_model, args.asr_lang)  # every speaker says every sentence
        record["asr_cer"] = voice_quality.character_error_rate(sentences * (len(paths) // len(sentences)), heard)
    if len(record) > 2:
        log.write(record)
        print(f"epoch {epoch} validation: {format_terms({k: v for k, v in record.items() if '_' in k})}")
    if scores:
        main_score = voice_quality.selection_score(record, next(iter(scores)), args.best_metric)
        if run.best is None or main_score < run.best:
            models.export_voice(trainer.model, tokenizer, trainer.disc,
                                os.path.join(args.output_dir, "checkpoints", "best_model"), speaker_table)
            run.best = main_score  # only once it is saved


def save_run_info(args, extra):
    """run_config.json: the flags, command line, versions and `extra` facts of the run (rank 0 writes it)."""
    os.makedirs(args.output_dir, exist_ok=True)
    if not distributed.is_main_process():
        return
    info = dict(args=vars(args), argv=sys.argv, torch=torch.__version__, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                processes=distributed.world_size(), **extra)
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    run_files.write_run_config(args.output_dir, info)


def add_run_info(args, facts):
    """Add `facts` (the plan's) to the run_config.json save_run_info wrote (rank 0)."""
    if not distributed.is_main_process():
        return
    path = os.path.join(args.output_dir, run_files.RUN_CONFIG)
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    run_files.write_run_config(args.output_dir, dict(info, **facts))
