"""VitsTrainer: the generator and the critic with their optimizers, LR schedules and GradScaler, and the
training step in the original VITS order (the critic steps first, then the generator's pass runs
through the updated critic), under autocast with fp32 losses; plus the machine set-up both trainers
share."""

import contextlib
import copy
import functools
import math
import random

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from voicetune.common import distributed
from voicetune.common import run_errors
from voicetune.night import checkpoints
from voicetune.night import clip_data
from voicetune.night import objective
from voicetune.voice import speakers


def native_bf16(device):
    """True where the GPU computes bf16 natively: compute capability 8.0 and up (Ampere, Ada, Hopper, ...).

    torch.cuda.is_bf16_supported() alone also says yes where bf16 is only emulated: a Turing card (7.5,
    such as an RTX 2070) can hold bf16 tensors but has no bf16 tensor cores.
    """
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument never counted emulation
        return torch.cuda.is_bf16_supported()


def resolve_precision(precision, device):
    """(precision, why): --precision auto is bf16 where the GPU computes it natively, else fp16 with the
    GradScaler, and fp32 on a CPU."""
    if precision != "auto":
        return precision, "as --precision asked"
    if device.type != "cuda":
        return "fp32", "auto: on a CPU"
    major, minor = torch.cuda.get_device_capability(device)
    if native_bf16(device):
        return "bf16", f"auto: this GPU (compute capability {major}.{minor}) computes bf16 natively"
    return "fp16", (f"auto: this GPU (compute capability {major}.{minor}) has no native bf16, so fp16 with a "
                    "GradScaler")


def set_up_machine(args):
    """Seeds, device, precision and (under torchrun) the process group, as both trainers start; says which
    precision and why. Returns (device, precision)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    device = distributed.resolve_device(args.device)
    if args.device == "auto" and device.type == "cpu":
        # A CPU-only torch (PyPI's Windows wheel is one) would otherwise spend the night on the CPU unnoticed.
        print(f"warning: torch {torch.__version__} sees no CUDA GPU, so this run trains on the CPU; for the GPU "
              "install torch's CUDA build (README, Windows), or pass --device cpu to mean it")
    precision, why = resolve_precision(args.precision, device)
    distributed.init_distributed(device)
    print(f"precision {precision} ({why})")
    return device, precision


def make_adamw(params, lr):
    """AdamW as VITS (betas 0.8/0.99, eps 1e-9), fused where the device has the kernel.

    The fused kernel updates every parameter in one pass (benchmarks/bench_train.py measures the gain);
    without it (an older torch, an unsupported device) the default loop.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr, betas=(0.8, 0.99), eps=1e-9, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr, betas=(0.8, 0.99), eps=1e-9)


@contextlib.contextmanager
def frozen(module):
    """No parameter gradients for `module` inside the block, restored even if the block raises."""
    module.requires_grad_(False)
    try:
        yield module
    finally:
        module.requires_grad_(True)


def lr_factor(step, warmup, total_steps, decay_from=None, hold=0):
    """LR multiplier at `step`: linear warm-up over `warmup` steps, or the full rate for the first `hold`
    steps; then cosine decay to 0 at total_steps (and 0 after it).

    decay_from=(step0, factor0): a re-planned run, whose cosine decays from factor0 at step0 instead.
    """
    if decay_from is not None and step >= decay_from[0]:
        start, peak = decay_from
    elif step < hold:
        return 1.0
    elif step < warmup:
        return step / max(1, warmup)
    else:
        start, peak = max(warmup, hold), 1.0
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# A critic trained from scratch in VITS runs at 2e-4: the least a fresh critic gets (--d_lr's default).
FRESH_CRITIC_LR = 2e-4


def critic_learning_rate(args, fresh):
    """The critic's peak learning rate: --d_lr; else for a fresh critic VITS's rate from scratch (or --lr,
    if higher: never slower than the generator it must judge), for a pretrained one --lr
    (finetune-hf-vits tunes generator and pretrained critic at one rate)."""
    return args.d_lr or (max(FRESH_CRITIC_LR, args.lr) if fresh else args.lr)


# The window's logged terms stay on the device until it ends, then come to the host in one transfer
# (read_totals): a .item() per term would wait for the device once per term, mid-step. False reads each
# term where it is made instead, as before (benchmarks/bench_train.py --levers --host_syncs switches it).
ONE_HOST_READ = True


def kept(value):
    """A logged term (a 0-dim tensor, or a float) as it waits for read_totals."""
    if ONE_HOST_READ:
        return torch.as_tensor(value)
    return torch.tensor(float(value), dtype=torch.float64)


def add_mean(totals, terms, n):
    """Each piece's terms, kept with the share of the window's mean they count for (1/n)."""
    for key, value in terms.items():
        totals.setdefault(key, []).append((kept(value), n))


def read_totals(totals):
    """The window's mean terms as floats: one read of all their tensors, then summed on the host in the
    order the pieces ran, so the numbers are those a .item() per term gave."""
    shares = [(key, n) for key, kept_shares in totals.items() for _, n in kept_shares]
    values = torch.stack([value for kept_shares in totals.values() for value, _ in kept_shares]).tolist()
    means = {}
    for (key, n), value in zip(shares, values):
        means[key] = means.get(key, 0.0) + value / n
    return means


class VitsTrainer:
    """Generator + discriminator with their optimizers, schedulers and GradScaler; one object to checkpoint."""

    def __init__(self, model, discriminator, args, device, precision, critic_lr=None, speaker_lr=None):
        """critic_lr: the critic's peak learning rate (default --lr; see critic_learning_rate); speaker_lr:
        that of a new multi-speaker voice's speaker embedding and conditioning layers (default --lr)."""
        self.model, self.disc = model.to(device), discriminator.to(device)
        self.args, self.device, self.precision = args, device, precision
        self.critic_lr = critic_lr or args.lr
        self.sampling_rate = model.config.sampling_rate
        named = list(self.model.named_parameters())
        new = [p for n, p in named if speakers.is_speaker_part(n)]
        groups = [dict(params=[p for n, p in named if not speakers.is_speaker_part(n)], lr=args.lr)]
        self.speaker_lr = speaker_lr or args.lr
        self.opt_g = make_adamw(groups + ([dict(params=new, lr=self.speaker_lr)] if new else []), args.lr)
        self.opt_d = make_adamw(self.disc.parameters(), self.critic_lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        if args.compile:
            # In place: the parameter names, checkpoints and exported voices stay those of eager modules.
            self.disc.compile()
            self.model.decoder.compile()
        # The passes whose gradients are averaged across torchrun's ranks; the frozen critic of the
        # generator pass leaves no gradient in itself and runs unwrapped.
        self.generator_pass = distributed.data_parallel(objective.GeneratorPass(self.model, args.segment_frames),
                                                        device)
        self.critic_pass = distributed.data_parallel(self.disc, device)
        self.schedule(1)
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.fp32_from_step = None  # the step fp16 gave way to fp32 at (fall_back_to_fp32)
        self.splits = {}  # micro-batch size -> pieces it trains in since it ran out of GPU memory
        self.oom_splits = 0

    def schedule(self, total_steps, d_warmup_steps=0, decay_from=(None, None)):
        """Linear warm-up then cosine decay over the planned optimizer steps (see lr_factor).

        The generator's schedule starts after the discriminator-only steps, which leave it untouched: they
        must not use up its warm-up. A critic with discriminator-only steps (a fresh one) trains them at
        its full rate, with no warm-up, and decays from there; as VITS trains a critic from scratch.
        decay_from: the generator's and the critic's (see replan).
        """
        for opt, peaks in ((self.opt_g, (self.args.lr, self.speaker_lr)), (self.opt_d, (self.critic_lr,))):
            for group, lr in zip(opt.param_groups, peaks):
                group["lr"] = lr
                group.pop("initial_lr", None)
        g_steps = max(1, total_steps - d_warmup_steps)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, self.lr_factor(g_steps, decay_from[0]))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(
            self.opt_d, self.lr_factor(total_steps, decay_from[1], hold=d_warmup_steps))

    def lr_factor(self, total_steps, decay_from=None, hold=0):
        warmup = 0 if hold else min(self.args.warmup_steps, max(0, total_steps - 1))
        return functools.partial(lr_factor, warmup=warmup, total_steps=total_steps, decay_from=decay_from,
                                 hold=hold)

    def replan(self, total_steps, d_warmup_steps=0):
        """A new end for a resumed run: from here the LR decays to 0 at `total_steps` and never goes up.

        Stretching the old cosine would raise the LR; keeping it would climb back up after its end.
        During a warm-up the warm-up goes on as planned. Each scheduler counts its own steps (the
        generator's only those after the discriminator-only ones). Returns decay_from for the plan.
        """
        decay_from = []
        for sched, steps, hold in ((self.sched_g, max(1, total_steps - d_warmup_steps), 0),
                                   (self.sched_d, total_steps, d_warmup_steps)):
            warmup = 0 if hold else min(self.args.warmup_steps, max(0, steps - 1))
            start = None
            if sched.last_epoch >= max(warmup, hold):
                start = [sched.last_epoch, sched.get_last_lr()[0] / sched.base_lrs[0]]
            sched.lr_lambdas = [self.lr_factor(steps, start, hold)] * len(sched.lr_lambdas)
            decay_from.append(start)
        return decay_from

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def lr(self):
        return self.sched_g.get_last_lr()[0]

    def train_window(self, batches, d_only=False):
        """One optimizer step over `batches` (gradient accumulation), in the original VITS order: the critic
        steps first, then the generator's pass runs through the updated critic. Returns the mean loss terms,
        or None for a skipped step (the critic's update, once made, stands, as in VITS).

        With one micro-batch the generator's forward serves both passes. With several, keeping every
        micro-batch's generator graph until the critic has stepped would cost the memory accumulation
        saves, so the critic's pass runs the generator without gradients and the generator's pass runs it
        again from the same RNG state: the same slices and noise, the same numbers.

        Out of GPU memory, the micro-batches are split into pieces (accumulated) and trained again from the
        window's RNG state: the update a run with that split would make. A critic that has already stepped
        keeps its one step; only the generator's part runs again. Later micro-batches of that size are split
        alike (self.splits, kept in checkpoints), and the epoch's clips are never regrouped.
        """
        self.model.train()
        self.disc.train()
        batches = [clip_data.to_device(batch, self.device) for batch in batches]
        start = checkpoints.rng_state()
        while True:
            pieces, totals = self.pieces(batches), {}
            try:
                critic = self.critic_phase(pieces, d_only, totals)
                break
            except torch.OutOfMemoryError:
                self.out_of_memory(batches, "the critic's pass")
                checkpoints.set_rng_state(start)
        if critic is None:
            return self.skipped()
        critic_stepped, outputs, rng = critic
        if d_only:
            return self.finish(critic_stepped, totals)
        while True:
            generator_totals = {}
            try:
                generator_stepped = self.generator_phase(pieces, outputs, rng, generator_totals)
                break
            except torch.OutOfMemoryError:
                self.out_of_memory(batches, "the generator's pass")
                # Every piece's forward again, in order from the window's RNG state, as a split run draws them.
                checkpoints.set_rng_state(start)
                pieces = self.pieces(batches)
                outputs, rng = [None] * len(pieces), [None] * len(pieces)
        if generator_stepped is None:
            self.scaler.update()
            return self.skipped()
        totals.update(generator_totals)
        return self.finish(critic_stepped and generator_stepped, totals)

    def critic_phase(self, pieces, d_only, totals):
        """The critic's loss and backward on every piece, then its step. Returns (stepped, the generator's
        outputs kept for its pass, the RNG state before each piece), or None for a non-finite loss."""
        keep_graph = len(pieces) == 1 and not d_only
        self.opt_d.zero_grad(set_to_none=True)
        outputs, rng = [], []
        for k, batch in enumerate(pieces):
            rng.append(None if keep_graph else checkpoints.rng_state())
            with self.no_sync(self.critic_pass, k < len(pieces) - 1):
                out, terms = self.critic_backward(batch, len(pieces), keep_graph)
            if terms is None:
                return None
            outputs.append(out if keep_graph else None)
            add_mean(totals, terms, len(pieces))
        stepped = self.update(self.opt_d, self.disc, totals, "grad_norm_d")
        if stepped:
            self.sched_d.step()
        return stepped, outputs, rng

    def generator_phase(self, pieces, outputs, rng, totals):
        """The generator's losses and backward on every piece (its forward again where none was kept), then
        its step. Returns whether it stepped, or None for a non-finite loss."""
        self.opt_g.zero_grad(set_to_none=True)
        for k, batch in enumerate(pieces):
            if outputs[k] is None:
                if rng[k] is not None:
                    checkpoints.set_rng_state(rng[k])
                outputs[k] = self.generator_outputs(batch)
            with self.no_sync(self.generator_pass, k < len(pieces) - 1):
                terms = self.generator_backward(outputs[k], len(pieces))
            outputs[k] = None
            if terms is None:
                return None
            add_mean(totals, terms, len(pieces))
        stepped = self.update(self.opt_g, self.model, totals, "grad_norm_g")
        if stepped:
            self.sched_g.step()
        return stepped

    def pieces(self, batches):
        """The window's micro-batches, each split into the pieces an earlier out-of-memory step set for its size."""
        if not self.splits:
            return batches
        out = []
        for batch in batches:
            n = self.splits.get(len(batch["frames"]), 1)
            chunks = {key: value.tensor_split(n) for key, value in batch.items()}
            out.extend({key: chunks[key][i] for key in batch} for i in range(n))
        return out

    def out_of_memory(self, batches, part):
        """Free what the failed attempt held and split micro-batches of this size into twice as many pieces;
        a run that cannot split further stops with one line, as does one under torchrun (the other
        processes would wait for this one in DDP's all-reduce)."""
        self.free_gpu_memory()
        size = max(len(batch["frames"]) for batch in batches)
        pieces = 2 * self.splits.get(size, 1)
        where = f"out of GPU memory at step {self.step + 1} in {part}"
        if distributed.world_size() > 1:
            raise run_errors.TrainingError(f"{where} under torchrun: give a smaller --batch_size (and a larger "
                                           "--grad_accum) to --resume auto")
        if pieces > size:
            raise run_errors.TrainingError(f"{where}: not even one clip fits (give a smaller --max_samples "
                                           "selection of shorter clips, or --precision fp16)")
        self.splits[size] = pieces
        self.oom_splits += 1
        tqdm.write(f"{where}: micro-batches of {size} clips now train in {pieces} pieces")

    def finish(self, stepped, totals):
        # fp16: finite losses with overflowing gradients are how the GradScaler finds its scale; they only
        # count towards --max_bad_steps once the scale is below 1, where overflow is no longer its search.
        searching = self.scaler.is_enabled() and self.scaler.get_scale() >= 1
        self.scaler.update()
        if not stepped:
            return self.skipped(bad=not searching)
        self.bad_steps = 0
        self.step += 1
        return read_totals(totals)

    def skipped(self, bad=True):
        """A step with a non-finite loss or gradient: its pending gradients dropped and counted; too many bad
        ones in a row stop the run."""
        self.drop_gradients()
        self.skipped_steps += 1
        self.bad_steps += bad
        if self.bad_steps >= self.args.max_bad_steps:
            if self.precision == "fp16":
                self.fall_back_to_fp32(f"{self.bad_steps} non-finite fp16 steps in a row at step {self.step}")
                return None
            raise run_errors.TrainingError(f"{self.bad_steps} non-finite training steps in a row at step {self.step}: "
                                           "stopping before the model is ruined (try --precision bf16/fp32 or a "
                                           "lower --lr)")
        return None

    def drop_gradients(self):
        self.opt_d.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)

    def free_gpu_memory(self):
        """Drop the pending gradients and hand the GPU memory the allocator keeps back (after running out)."""
        self.drop_gradients()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def trial_steps(self):
        """Training steps that leave no trace (a benchmark, batch auto's trials): weights, optimizer, schedule
        and scaler states and the step counters are restored afterwards."""
        parts = dict(model=self.model, disc=self.disc, opt_g=self.opt_g, opt_d=self.opt_d, sched_g=self.sched_g,
                     sched_d=self.sched_d, scaler=self.scaler)
        snapshot = {name: copy.deepcopy(part.state_dict()) for name, part in parts.items()}
        counters = self.step, self.bad_steps, self.skipped_steps
        try:
            yield self
        finally:
            self.drop_gradients()
            for name, part in parts.items():
                part.load_state_dict(snapshot[name])
            self.step, self.bad_steps, self.skipped_steps = counters

    def fall_back_to_fp32(self, why):
        """Go on in fp32 from here: fp16 that keeps overflowing would stop the night. The skipped steps left
        the weights, optimizers and schedules as they were, so the night continues from that state; the
        checkpoints record it, and a resumed run stays in fp32 unless --precision fp16 is given again."""
        tqdm.write(f"{why}: going on in fp32 (the skipped steps changed nothing; slower, but the night goes on)")
        self.precision = "fp32"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.bad_steps = 0
        self.fp32_from_step = self.step

    def no_sync(self, net, accumulating):
        """Under DDP, gradients are averaged once per optimizer step: not after the window's earlier micro-batches."""
        if accumulating and isinstance(net, DistributedDataParallel):
            return net.no_sync()
        return contextlib.nullcontext()

    def generator_outputs(self, batch, grad=True):
        with self.autocast(), torch.set_grad_enabled(grad):
            return self.generator_pass(batch)

    def critic_backward(self, batch, accum, keep_graph):
        """The generator's forward and the critic's loss on real and (detached) generated slices, backward.

        Returns (generator outputs, terms): the terms are tensors (read at the window's end, read_totals), None
        when the loss is not finite on some process.
        """
        try:
            out = self.generator_outputs(batch, grad=keep_graph)
            with self.autocast():
                real_fake = torch.cat([out["audio"], out["audio_hat"].detach().to(out["audio"].dtype)])
                logits, _ = self.critic_pass(real_fake)
            half = out["audio"].size(0)
            loss_d = objective.discriminator_loss([l[:half] for l in logits], [l[half:] for l in logits])
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as err:
            # A diverging model feeds inf/NaN to the duration spline or MAS, which raise: a bad step too,
            # agreed below like a non-finite loss (under DDP the other ranks wait in that agreement).
            message = str(err).splitlines()[0] if str(err) else ""
            tqdm.write(f"step {self.step + 1} skipped: {type(err).__name__}: {message}")
            out, loss_d = None, torch.tensor(float("nan"))
        # Under DDP every rank must run the same backward passes: a step is skipped on all or none.
        if not distributed.all_ranks(torch.isfinite(loss_d)):
            return out, None
        self.scaler.scale(loss_d / accum).backward()
        return out, dict(d=loss_d.detach())

    def generator_backward(self, out, accum):
        """The generator's losses through the (updated, frozen) critic, backward. Returns the terms (tensors) or
        None."""
        fake_logits, real_features, fake_features = self.generator_critic(out)
        loss_adv = objective.generator_adversarial_loss(fake_logits)
        loss_fm = objective.feature_matching_loss(real_features, fake_features)
        loss_mel = objective.mel_slice_loss(out, self.sampling_rate)
        loss_g = (loss_adv + loss_fm + self.args.c_mel * loss_mel + self.args.c_kl * out["loss_kl"]
                  + out["loss_dur"])
        if not distributed.all_ranks(torch.isfinite(loss_g)):
            return None
        self.scaler.scale(loss_g / accum).backward()
        terms = dict(g=loss_g, adv=loss_adv, fm=loss_fm, mel=loss_mel, kl=out["loss_kl"], dur=out["loss_dur"])
        return {key: value.detach() for key, value in terms.items()}

    def generator_critic(self, out):
        """The updated critic, frozen, on the real and the generated slices: (fake logits, real features, fake
        features). The real slices need no gradient, so they run without a graph; weight norm is computed
        once for both calls."""
        with frozen(self.disc), nn.utils.parametrize.cached(), self.autocast():
            with torch.no_grad():
                _, real_features = self.disc(out["audio"])
            fake_logits, fake_features = self.disc(out["audio_hat"].to(out["audio"].dtype))
        return fake_logits, real_features, fake_features

    def update(self, opt, net, totals, norm_key):
        """Clip and step one network; its gradient norm before clipping goes to totals[norm_key] (as VITS
        logs it: whether --grad_clip ever binds). False, and no update, when its gradients are not finite
        (with fp16 the GradScaler skips that step itself and lowers its scale at the window's end)."""
        self.scaler.unscale_(opt)
        norm = nn.utils.clip_grad_norm_(net.parameters(), self.args.grad_clip)
        if not torch.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            return False
        totals[norm_key] = [(kept(norm), 1)]
        self.scaler.step(opt)
        return True

    @torch.no_grad()
    def evaluate(self, clipset, batch_size):
        """Validation loss terms on fixed slices (seeded), so epochs compare like with like."""
        if len(clipset) == 0:
            return {}
        self.model.eval()
        totals, count = {}, 0
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            for items in clip_data.bucket_batches([clipset.frames(i) for i in range(len(clipset))], batch_size, 0):
                batch = clip_data.to_device(clip_data.collate([(clipset, i) for i in items], self.args.segment_frames),
                                            self.device)
                try:
                    with self.autocast():
                        out = objective.generator_forward(self.model, batch, self.args.segment_frames)
                    terms = dict(mel=objective.mel_slice_loss(out, self.sampling_rate).item(),
                                 kl=out["loss_kl"].item(), dur=out["loss_dur"].item())
                except torch.OutOfMemoryError:
                    raise
                except (RuntimeError, ValueError):
                    # A diverged model feeds inf/NaN to the duration spline or MAS, which raise (as in a
                    # training step): its figures are NaN, for the report and the verdict to say so.
                    terms = dict(mel=math.nan, kl=math.nan, dur=math.nan)
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + v * len(items)
                count += len(items)
        self.model.train()
        return {k: v / count for k, v in totals.items()}

    def state_dict(self):
        return dict(model=self.model.state_dict(), disc=self.disc.state_dict(), opt_g=self.opt_g.state_dict(),
                    opt_d=self.opt_d.state_dict(), sched_g=self.sched_g.state_dict(),
                    sched_d=self.sched_d.state_dict(), scaler=self.scaler.state_dict(), step=self.step,
                    skipped_steps=self.skipped_steps, fp32_from_step=self.fp32_from_step, splits=dict(self.splits),
                    oom_splits=self.oom_splits)

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        left_fp16 = state.get("fp32_from_step")
        if left_fp16 is not None and self.precision == "fp16" and self.args.precision != "fp16":
            self.fall_back_to_fp32(f"the run left fp16 at step {left_fp16}")
        self.fp32_from_step = left_fp16
        self.splits, self.oom_splits = dict(state.get("splits", {})), state.get("oom_splits", 0)
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
