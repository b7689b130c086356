"""The night's plan: the wall-clock budget and what must be kept back of it, the throughput benchmark,
--batch_size auto, how many epochs fit, and re-planning: a resumed run's plan, and a --max_steps run the
budget cannot hold."""

import argparse
import dataclasses
import math
import time

import torch
from tqdm.auto import tqdm

from voicetune.common import distributed
from voicetune.common import run_errors
from voicetune.night import clip_data
from voicetune.night import training_flags

EPOCH_OVERHEAD_S = 10.0  # saving a checkpoint and the listening samples after each epoch, a guess


@dataclasses.dataclass
class Plan:
    """How long a run is: its epochs and optimizer steps, and the pace they were planned at (a checkpoint
    keeps it as a dict, dataclasses.asdict)."""
    epochs: int
    total_steps: int
    steps_per_epoch: int
    samples_per_s: float | None = None  # measured by the benchmark; None where --epochs or --max_steps gave it
    d_only_samples_per_s: float | None = None  # the critic-only steps', where they were measured apart
    # The fresh critic's solo warm-up as planned, and as asked for before critic_warmup kept it to its share
    # of the steps (the run's own count, Run.d_warmup_steps, is what a --max_steps re-plan leaves of it).
    d_warmup_steps: int = 0
    d_warmup_steps_asked: int = 0
    # A re-planned schedule: the generator's and the critic's [step, LR factor] its cosine decays from.
    decay_from: list | None = None


class Budget:
    """Wall-clock budget of a run, counting what earlier (resumed) parts of the run already used, and what
    must be kept back of it: the last checkpoint and the final model at the deadline, the end-of-epoch
    work (validation, samples) only where it fits, and whatever the caller does after training."""

    def __init__(self, seconds, used_before=0.0):
        self.seconds, self.used_before, self.start = seconds, used_before, time.time()
        self.save_seconds = [5.0]  # every checkpoint's time so far, a guess before the first
        # Validation + listening samples, as last measured; before the first, the plan's estimate, or a guess.
        self.end_of_epoch_seconds = EPOCH_OVERHEAD_S

    def used(self):
        return self.used_before + time.time() - self.start

    def left(self):
        return self.seconds - self.used()

    def keep_back(self, seconds):
        """Leave `seconds` of the budget for work after training (train_feedback.py's after samples)."""
        self.seconds -= seconds

    def saved(self, seconds):
        self.save_seconds.append(seconds)

    def reserve(self):
        """Time kept back at the deadline for the last checkpoint and the final model."""
        return 2.5 * max(self.save_seconds) + 2.0

    def out_of_time(self):
        return self.left() < self.reserve()

    def end_of_epoch_fits(self):
        return self.left() > self.reserve() + self.end_of_epoch_seconds


def largest_batch(effective, try_batch, headroom=0.1):
    """Largest divisor of `effective` whose trial step fits with `headroom` of the memory to spare.

    try_batch(b) -> (peak bytes, capacity bytes) of a real step at micro-batch b; it raises
    torch.OutOfMemoryError when the step does not fit at all. Returns None if not even 1 fits.
    """
    best = None
    for b in [d for d in range(1, effective + 1) if effective % d == 0]:
        try:
            peak, capacity = try_batch(b)
        except torch.OutOfMemoryError:
            break
        if peak > (1 - headroom) * capacity:
            break
        best = b
    return best


def gpu_memory_bytes(device):
    """The GPU memory this process may use: what is free plus what its allocator already holds (the CUDA
    context, a desktop or other programs keep the rest), within set_per_process_memory_fraction's share."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index)
    return int(min(free + torch.cuda.memory_reserved(index), total * fraction))


def choose_batch_size(trainer, clipset, args, resumed=None):
    """--batch_size auto -> (micro-batch, grad_accum) with training_flags.AUTO_CPU_BATCH x --grad_accum clips a step; a
    resumed run (`resumed`: its checkpoint) keeps the batch it chose when it started."""
    if resumed is not None:
        saved = resumed["args"]
        print(f"batch size auto: {saved['batch_size']} clips x {saved['grad_accum']} accumulated, as the resumed "
              "run had")
        return saved["batch_size"], saved["grad_accum"]
    effective = training_flags.AUTO_CPU_BATCH * args.grad_accum
    device = trainer.device
    # Under torchrun a trial that runs out of memory on one process would leave the others waiting in its
    # all-reduce: there auto does not search.
    if device.type != "cuda" or distributed.world_size() > 1:
        batch = training_flags.AUTO_CPU_BATCH
    else:
        longest = sorted(range(len(clipset)), key=clipset.frames, reverse=True)

        def try_batch(b):
            items = [(clipset, longest[i % len(longest)]) for i in range(b)]
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            with trainer.trial_steps():
                trainer.train_window([clip_data.collate(items, args.segment_frames)])
            # Reserved, not allocated: what the allocator had to hold, fragmentation included.
            return torch.cuda.max_memory_reserved(device), gpu_memory_bytes(device)
        batch = largest_batch(effective, try_batch)
        torch.cuda.empty_cache()
        if batch is None:
            raise run_errors.TrainingError("--batch_size auto: not even one clip of the longest fits in GPU memory "
                                           "(use a shorter --max_samples selection or --precision bf16/fp16)")
    searched = device.type == "cuda" and distributed.world_size() == 1
    print(f"batch size auto: {batch} clips x {effective // batch} accumulated = {effective} per optimizer step"
          + (" (the longest clips fit with 10% of the GPU memory to spare)" if searched else "")
          + (" (under torchrun auto does not search: give --batch_size to choose)"
             if distributed.world_size() > 1 else ""))
    return batch, effective // batch


# The benchmark's share of the budget: it stops early, with what it measured, once it has used this much.
BENCHMARK_SHARE = 0.02


def benchmark_throughput(trainer, batches, grad_accum, samples, d_only=False, max_seconds=math.inf):
    """Samples/s of real training steps of one kind over `samples` samples (or as many as `max_seconds`
    allows, warm-up included, at least one), cycling through `batches` in windows of `grad_accum` after one
    warm-up step; the weights are restored afterwards."""
    windows = [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]
    with trainer.trial_steps():
        began = time.time()
        trainer.train_window(windows[0], d_only=d_only)
        distributed.sync(trainer.device)
        warm_up_s = time.time() - began
        # A budget so short that the warm-up step alone took the share: that step is the measure (its
        # start-up costs make the plan err on the short side, never past the deadline).
        if distributed.any_rank(warm_up_s >= max_seconds):
            return sum(len(b["frames"]) for b in windows[0]) / max(warm_up_s, 1e-9)
        done, start, count = 0, time.time(), 0
        # Ranks' batches differ in size, and their clocks: all take the same steps, stopping together.
        while not distributed.any_rank(done >= samples or (count and time.time() - began >= max_seconds)):
            count += 1
            window = windows[count % len(windows)]
            trainer.train_window(window, d_only=d_only)
            done += sum(len(b["frames"]) for b in window)
        distributed.sync(trainer.device)
        elapsed = time.time() - start
    return done / max(elapsed, 1e-9)


def steps_that_fit(seconds, step_samples, samples_per_s, d_only_per_s, d_warmup, end_of_epoch_s):
    """Optimizer steps that fit `seconds`: whole epochs (`step_samples`: the clips of each step of one, as
    every rank together trains them), each followed by validation and saving (`end_of_epoch_s`), then what
    fits of one more, without its validation. The first `d_warmup` steps, critic-only, run at d_only_per_s."""
    steps, left = 0, seconds
    while True:
        costs = [n / (d_only_per_s if steps + k < d_warmup else samples_per_s) for k, n in enumerate(step_samples)]
        if sum(costs) + end_of_epoch_s > left:
            break
        steps, left = steps + len(costs), left - sum(costs) - end_of_epoch_s
    for cost in costs:
        if cost > left:
            break
        steps, left = steps + 1, left - cost
    return steps


# At most this share of a run's planned steps trains the fresh critic alone: a short budget whose steps
# would all fall inside the solo warm-up would end "done" with the voice untouched.
CRITIC_WARMUP_SHARE = 0.5


def critic_warmup(asked, steps_for):
    """The critic's solo steps: `asked`, shortened to at most CRITIC_WARMUP_SHARE of the run's steps.

    steps_for(warmup) -> the steps the run plans with that many solo steps (more solo steps may fit more:
    they are faster). A shorter warm-up fits fewer steps, so it is shortened until it is within its share."""
    warmup = asked
    while warmup > int(CRITIC_WARMUP_SHARE * steps_for(warmup)):
        warmup = int(CRITIC_WARMUP_SHARE * steps_for(warmup))
    return warmup


def plan_run(trainer, train_sets, make_batches, n_val, args, budget, d_warmup=0):
    """Size the run and its LR schedule: --epochs or --max_steps as given (the deadline still holds, and
    fit re-plans a --max_steps run the budget cannot hold); otherwise benchmark both kinds of step the run
    will do, within a small share of the budget, and plan the steps that fit it. A fresh critic's solo
    warm-up of `d_warmup` steps is kept to its share of the plan (critic_warmup), said in one line where it
    is shortened. Prints the plan."""
    windows = make_batches(1)
    world = distributed.world_size()
    step_samples = [world * sum(len(b) for b in windows[i:i + args.grad_accum])
                    for i in range(0, len(windows), args.grad_accum)]
    steps_per_epoch = len(step_samples)
    samples_per_s = d_only_per_s = None
    asked_warmup = d_warmup
    if args.epochs or args.max_steps:
        epochs = args.epochs or math.ceil(args.max_steps / steps_per_epoch)
        total_steps = min(epochs * steps_per_epoch, args.max_steps or math.inf)
        d_warmup = critic_warmup(d_warmup, lambda warmup: total_steps)
    else:
        share = BENCHMARK_SHARE * budget.left() / (2 if d_warmup else 1)
        first = make_batches(0)
        bench = [clip_data.collate(items, args.segment_frames) for items in first[:max(2, 2 * args.grad_accum)]]
        began = time.time()
        # Ranks step together, at the pace of the slowest one.
        samples_per_s = world * distributed.all_reduce(
            benchmark_throughput(trainer, bench, args.grad_accum, args.benchmark_samples, max_seconds=share), "min")
        # When the full steps already took both shares, the critic-only steps are planned at their pace:
        # they are faster, so the plan can only come out short.
        if d_warmup and not distributed.any_rank(time.time() - began >= 2 * share):
            # The discriminator-only warm-up steps are faster; a quarter of the samples tells by how much.
            d_only_per_s = world * distributed.all_reduce(
                benchmark_throughput(trainer, bench, args.grad_accum, max(1, args.benchmark_samples // 4),
                                     d_only=True, max_seconds=share), "min")
        end_of_epoch_s = n_val / (3 * samples_per_s) + EPOCH_OVERHEAD_S
        budget.end_of_epoch_seconds = end_of_epoch_s
        # What is kept back for the last checkpoint and the final model is no time to train in.
        seconds = budget.left() - budget.reserve()
        d_warmup = critic_warmup(d_warmup, lambda warmup: steps_that_fit(
            seconds, step_samples, samples_per_s, d_only_per_s or samples_per_s, warmup, end_of_epoch_s))
        total_steps = steps_that_fit(seconds, step_samples, samples_per_s, d_only_per_s or samples_per_s, d_warmup,
                                     end_of_epoch_s)
        if total_steps == 0:
            raise run_errors.TrainingError(
                f"--target_hours {args.target_hours:g}: the {budget.left():.0f} s of budget left hold no training "
                f"step ({step_samples[0] / samples_per_s:.1f} s each, measured): give a longer budget")
        epochs = math.ceil(total_steps / steps_per_epoch)
        epoch_s = sum(step_samples) / samples_per_s
        warm = f" ({d_only_per_s:.2f} in the {d_warmup} discriminator-only steps)" if d_only_per_s and d_warmup else ""
        print(f"plan: {samples_per_s:.2f} samples/s{warm}, {epoch_s / 60:.1f} min/epoch "
              f"({(epoch_s + end_of_epoch_s) / 60:.1f} with validation and saving), {total_steps} steps = "
              f"{total_steps / steps_per_epoch:.2f} epochs, finishing about "
              f"{time.strftime('%H:%M', time.localtime(time.time() + budget.left()))}")
    if d_warmup < asked_warmup:
        print(f"plan: the critic's solo warm-up is shortened from {asked_warmup} to {d_warmup} steps, "
              f"{CRITIC_WARMUP_SHARE:.0%} of the {total_steps} planned at most, so the voice itself trains "
              f"{total_steps - d_warmup} steps")
    if world > 1:
        print(f"torchrun: {world} processes x --batch_size {args.batch_size} x --grad_accum {args.grad_accum} "
              f"= global batch of {world * args.batch_size * args.grad_accum} clips, "
              f"{steps_per_epoch} optimizer steps per epoch")
    return Plan(epochs=epochs, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                samples_per_s=samples_per_s, d_only_samples_per_s=d_only_per_s, d_warmup_steps=d_warmup,
                d_warmup_steps_asked=asked_warmup)


def with_batch(args, batch_size, grad_accum):
    """The run's flags with --batch_size auto's choice in place (a copy: the parsed flags stay as given)."""
    return argparse.Namespace(**dict(vars(args), batch_size=batch_size, grad_accum=grad_accum))


def resumed_plan(trainer, state, args):
    """The plan of the run of checkpoint `state`, which `trainer` has just loaded: as it was, but stopping at
    another --max_steps, and re-planned for another --epochs."""
    plan = Plan(**state["plan"])
    if args.max_steps != state["args"].get("max_steps"):
        # Another --max_steps moves where the run stops, not its learning-rate schedule.
        plan.total_steps = min(plan.epochs * plan.steps_per_epoch, args.max_steps or math.inf)
    if args.epochs and args.epochs != plan.epochs:
        resize_plan(trainer, plan, args.epochs, args.max_steps, state["d_warmup_steps"])
    return plan


def resize_plan(trainer, plan, epochs, max_steps, d_warmup_steps=0):
    """--epochs changed on resume: the schedule ends at the new last step, from the LR it has now."""
    total_steps = epochs * plan.steps_per_epoch
    if max_steps:
        total_steps = min(total_steps, max_steps)
    plan.epochs, plan.total_steps = epochs, total_steps
    plan.decay_from = trainer.replan(total_steps, d_warmup_steps)
    print(f"plan: {epochs} epochs, {total_steps} steps; the learning rate decays from {trainer.lr():.2e} "
          f"at step {trainer.step}")


class StepPace:
    """A --max_steps run has no benchmark: its first real steps tell the pace. Where the budget would end
    before the last step, the plan ends where the budget does (the learning rate decays to 0 there, from
    where it is, never up), instead of the deadline cutting the schedule short; and a fresh critic's solo
    warm-up (run.d_warmup_steps) is kept to its share of the steps left (critic_warmup)."""

    MEASURED_STEPS = 4  # after the first, whose start-up costs are no pace

    def __init__(self, trainer, plan, args, budget, run):
        self.trainer, self.plan, self.budget, self.run = trainer, plan, budget, run
        self.watching = bool(args.max_steps) and not args.epochs and plan.samples_per_s is None
        self.seconds = []

    def stepped(self, seconds):
        """One step took `seconds` (collating its batches included)."""
        if not self.watching:
            return
        self.seconds.append(seconds)
        if len(self.seconds) < 1 + self.MEASURED_STEPS:
            return
        self.watching = False
        step_s = distributed.all_reduce(sum(self.seconds[1:]) / self.MEASURED_STEPS, "max")
        trainer, plan = self.trainer, self.plan
        seconds = self.budget.left() - self.budget.reserve()
        finish = time.strftime("%H:%M", time.localtime(time.time() + (plan.total_steps - trainer.step) * step_s))
        if (plan.total_steps - trainer.step) * step_s <= seconds:
            tqdm.write(f"plan: {step_s:.2f} s a step, {plan.total_steps} steps, finishing about {finish}")
            return
        total, asked = trainer.step + max(0, int(seconds / step_s)), plan.total_steps
        # The solo steps already taken stay taken.
        warmup = max(min(trainer.step, self.run.d_warmup_steps),
                     critic_warmup(self.run.d_warmup_steps, lambda _: total))
        if warmup < self.run.d_warmup_steps:
            tqdm.write(f"plan: the critic's solo warm-up is shortened from {self.run.d_warmup_steps} to {warmup} "
                       f"steps, so the voice itself trains {total - warmup} steps")
            self.run.d_warmup_steps = warmup
        plan.total_steps, plan.epochs = total, max(1, math.ceil(total / plan.steps_per_epoch))
        plan.decay_from = trainer.replan(total, warmup)
        tqdm.write(f"plan: {step_s:.2f} s a step: the budget holds {total} of the {asked} steps asked for; the "
                   f"learning rate now decays to 0 at step {total}")
