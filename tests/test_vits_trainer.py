"""vits_trainer.py: the critic-first step as the original VITS takes it, precision (fp16 with its scaler, the
fall-back to fp32), skipped and non-finite steps, out of GPU memory, gradient norms, optimizers and the
learning-rate schedules."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from voicetune.common import run_errors
from voicetune.night import clip_data
from voicetune.night import objective
from voicetune.voice import models
from voicetune.voice import spectrogram
import train_vits
from voicetune.night import training_flags
from voicetune.night import vits_trainer
from conftest import short_batch, tiny_trainer


def batch_of(clipset, n):
    return clip_data.collate([(clipset, i) for i in range(n)], 32)


def test_one_step_gives_every_trainable_parameter_a_gradient(tiny_model_dir, tiny_clips):
    trainer = tiny_trainer(tiny_model_dir)
    out, _ = trainer.critic_backward(batch_of(tiny_clips, 2), accum=1, keep_graph=True)
    trainer.generator_backward(out, accum=1)
    missing = [name for name, p in trainer.model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    missing += [name for name, p in trainer.disc.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []
    for part in ("text_encoder", "posterior_encoder", "flow", "decoder", "duration_predictor"):
        assert any(n.startswith(part) for n, _ in trainer.model.named_parameters())


def original_vits_step(model, disc, batches, lr, clip=100.0):
    """jaywalnut310/vits train.py's step, written out, with our clipping and AdamW: the critic's loss
    backward and its optimizer step first, then the generator's losses through the updated critic (run on
    real and generated slices) and its step. Several batches: gradients averaged, graphs all kept."""
    opt_d = torch.optim.AdamW(disc.parameters(), lr, betas=(0.8, 0.99), eps=1e-9)
    opt_g = torch.optim.AdamW(model.parameters(), lr, betas=(0.8, 0.99), eps=1e-9)
    outs = [objective.generator_forward(model, batch, 32) for batch in batches]
    for out in outs:
        real, _ = disc(out["audio"])
        fake, _ = disc(out["audio_hat"].detach())
        loss_d = sum(torch.mean((1 - r) ** 2) + torch.mean(f ** 2) for r, f in zip(real, fake))
        (loss_d / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(disc.parameters(), clip)
    opt_d.step()
    critic_grads = [p.grad.clone() for p in disc.parameters()]
    for out in outs:
        _, real_features = disc(out["audio"])
        fake, fake_features = disc(out["audio_hat"])
        adv = sum(torch.mean((1 - f) ** 2) for f in fake)
        fm = 2 * sum(torch.mean(torch.abs(r - f)) for rs, fs in zip(real_features, fake_features) for r, f in zip(rs, fs))
        mel = torch.mean(torch.abs(spectrogram.mel_spectrogram(out["audio_hat"][:, 0], 16000) - out["mel"]))
        loss_g = adv + fm + 45 * mel + out["loss_kl"] + out["loss_dur"]
        (loss_g / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt_g.step()
    return critic_grads, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_step_is_the_original_vits_order_critic_first(tiny_model_dir, tiny_clips, micro_batches):
    # A high LR, so that the critic's update visibly changes the generator's adversarial gradients.
    trainer = tiny_trainer(tiny_model_dir, "--lr", "5e-2")
    plain_model, plain_disc = copy.deepcopy(trainer.model), copy.deepcopy(trainer.disc)
    batches = [clip_data.collate([(tiny_clips, 2 * k), (tiny_clips, 2 * k + 1)], 32) for k in range(micro_batches)]
    torch.manual_seed(0)
    assert trainer.train_window(batches) is not None
    torch.manual_seed(0)
    critic_grads, generator_grads = original_vits_step(plain_model, plain_disc, batches, lr=5e-2)

    def close(ours, plain):
        torch.testing.assert_close(ours, plain, rtol=1e-3, atol=1e-4 * float(plain.abs().max()))
    for p, grad in zip(trainer.disc.parameters(), critic_grads):
        close(p.grad, grad)
    # The generator's gradients went through the critic as the plain step updated it: the same critic step,
    # taken before the generator's pass.
    for p, grad in zip(trainer.model.parameters(), generator_grads):
        if grad is not None:
            close(p.grad, grad)


def test_critic_is_unfrozen_when_the_generator_pass_fails(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    forward, calls = trainer.disc.forward, []

    def failing_third_call(audio):
        calls.append((audio.shape[0], torch.is_grad_enabled()))
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return forward(audio)
    monkeypatch.setattr(trainer.disc, "forward", failing_third_call)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train_window([batch_of(tiny_clips, 2)])
    # The critic's pass on real + generated rows, then the generator's: the 2 real rows without a graph,
    # the 2 generated ones with one.
    assert calls == [(4, True), (2, False), (2, True)]
    assert all(p.requires_grad for p in trainer.disc.parameters())


def test_compile_flag_compiles_the_critic_and_decoder_in_place(tiny_model_dir, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model, _ = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    for flags, expected in (([], []), (["--compile"], ["disc", "decoder"])):
        compiled.clear()
        trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), train_vits.parse_args(flags),
                                 torch.device("cpu"), "fp32")
        parts = dict(disc=trainer.disc, decoder=trainer.model.decoder)
        assert [next(k for k, v in parts.items() if v is m) for m in compiled] == expected


def test_adamw_is_fused_where_supported_and_falls_back(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert vits_trainer.make_adamw(params, 1e-3).defaults["fused"] is True  # torch's CPU kernel
    adamw = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("fused=True requires all the params to be floating point Tensors of supported devices")
        return adamw(*args, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = vits_trainer.make_adamw(params, 1e-3)
    assert not opt.defaults["fused"] and opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["eps"] == 1e-9


def test_overfitting_four_clips_halves_the_mel_loss(tiny_model_dir, tiny_clips):
    torch.manual_seed(0)
    trainer = tiny_trainer(tiny_model_dir, "--lr", "2e-3")
    four = tiny_clips.subset(range(4))
    before = trainer.evaluate(four, 4)["mel"]
    batch = batch_of(four, 4)
    for _ in range(20):  # it halves by step 10 and is at 0.41 by step 20 (measured)
        assert trainer.train_window([batch]) is not None
    after = trainer.evaluate(four, 4)["mel"]
    assert after <= 0.5 * before, (before, after)


def fake_gpu(monkeypatch, capability, native_bf16):
    """torch.cuda as a card of `capability` reports it; bf16 is emulated on cards without native bf16, so
    is_bf16_supported() says yes there unless emulation is excluded."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def test_auto_precision_is_fp16_on_a_turing_card_and_bf16_where_bf16_is_native(monkeypatch):
    cuda = torch.device("cuda:0")
    fake_gpu(monkeypatch, (7, 5), native_bf16=False)  # RTX 2070
    precision, why = vits_trainer.resolve_precision("auto", cuda)
    assert precision == "fp16" and "7.5" in why and "no native bf16" in why
    fake_gpu(monkeypatch, (8, 6), native_bf16=True)  # RTX 3090
    assert vits_trainer.resolve_precision("auto", cuda)[0] == "bf16"
    fake_gpu(monkeypatch, (8, 0), native_bf16=False)  # a capability-8 device that still only emulates it
    assert vits_trainer.resolve_precision("auto", cuda)[0] == "fp16"
    # A torch without including_emulation, whose is_bf16_supported() counts emulation: still fp16 on Turing.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert vits_trainer.resolve_precision("auto", cuda)[0] == "fp16"
    assert vits_trainer.resolve_precision("auto", torch.device("cpu"))[0] == "fp32"
    assert vits_trainer.resolve_precision("bf16", cuda)[0] == "bf16"  # asked for: as asked


def test_a_night_that_would_train_on_the_cpu_unasked_says_so(monkeypatch, capsys):
    # A CPU-only torch (PyPI's Windows wheel): --device auto finds no GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = training_flags.build_parser("").parse_args([])
    assert vits_trainer.set_up_machine(args) == (torch.device("cpu"), "fp32")
    assert "warning: torch " + torch.__version__ + " sees no CUDA GPU, so this run trains on the CPU" \
        in capsys.readouterr().out
    args = training_flags.build_parser("").parse_args(["--device", "cpu"])  # asked for: no warning
    assert vits_trainer.set_up_machine(args)[0] == torch.device("cpu")
    assert "warning" not in capsys.readouterr().out


def weights(trainer):
    return {k: v.clone() for k, v in list(trainer.model.state_dict().items()) + list(trainer.disc.state_dict().items())}


def test_fp16_runs_on_cpu_and_an_overflow_is_skipped_counted_and_leaves_the_weights(tiny_model_dir, tiny_clips):
    model, _ = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    args = train_vits.parse_args(["--warmup_steps", "0", "--grad_accum", "1", "--precision", "fp16", "--device", "cpu"])
    precision, _ = vits_trainer.resolve_precision(args.precision, torch.device("cpu"))
    trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"), precision)
    trainer.schedule(100)
    assert trainer.scaler.is_enabled()
    # The random tiny model's text-encoder gradients overflow fp16 at scales of 8 and more, at 1 on some
    # slices (measured): start low instead of spending a dozen skipped steps on the scaler's search.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -4)
    torch.manual_seed(0)
    batch = batch_of(tiny_clips, 2)
    for d_only in (True, False):
        terms = trainer.train_window([batch], d_only=d_only)
        assert terms is not None and all(np.isfinite(v) for v in terms.values()), terms
    assert trainer.step == 2 and trainer.skipped_steps == 0

    # A loss scale no fp16 gradient survives: the scaler skips the update and halves its scale.
    trainer.scaler.update(2.0 ** 100)
    weights = {k: v.clone() for k, v in itertools.chain(trainer.model.state_dict().items(),
                                                        trainer.disc.state_dict().items())}
    assert trainer.train_window([batch]) is None
    assert trainer.scaler.get_scale() == 2.0 ** 99  # halved: the scaler saw the overflow
    assert trainer.step == 2 and trainer.skipped_steps == 1
    after = dict(itertools.chain(trainer.model.state_dict().items(), trainer.disc.state_dict().items()))
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    # That was the scaler's search for its scale, not divergence: it does not count towards --max_bad_steps.
    assert trainer.bad_steps == 0

    # Below a scale of 1 an overflow is no longer the search: it counts. Only the generator's gradients
    # overflow here, so the critic, which steps first, keeps its update.
    trainer.scaler.update(2.0 ** -2)
    hook = trainer.model.text_encoder.embed_tokens.weight.register_hook(lambda g: g * float("inf"))
    critic = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    assert trainer.train_window([batch]) is None
    hook.remove()
    assert trainer.scaler.get_scale() == 2.0 ** -3
    assert trainer.step == 2 and trainer.skipped_steps == 2 and trainer.bad_steps == 1
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert not all(torch.equal(critic[k], v) for k, v in trainer.disc.state_dict().items())


def fp16_trainer(tiny_model_dir, *flags):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "2e-5", "--max_bad_steps", "3", *flags, precision="fp16", steps=100)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -4)  # the tiny model's gradients fit here
    return trainer


def everything(trainer):
    """What a skipped step must leave as it was: weights, optimizer and schedule states."""
    return copy.deepcopy(dict(model=trainer.model.state_dict(), disc=trainer.disc.state_dict(),
                              opt_g=trainer.opt_g.state_dict(), opt_d=trainer.opt_d.state_dict(),
                              sched=(trainer.sched_g.last_epoch, trainer.sched_d.last_epoch), step=trainer.step))


def assert_same(a, b):
    for key in ("model", "disc"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("opt_g", "opt_d"):
        for p, state in a[key]["state"].items():
            assert all(torch.equal(v, b[key]["state"][p][n]) for n, v in state.items() if torch.is_tensor(v)), key
    assert a["sched"] == b["sched"] and a["step"] == b["step"]


def test_fp16_that_keeps_failing_goes_on_in_fp32_from_the_state_the_skipped_steps_left(tiny_model_dir, tiny_clips,
                                                                                       monkeypatch, capsys):
    trainer = fp16_trainer(tiny_model_dir)
    batch = clip_data.collate([(tiny_clips, 0), (tiny_clips, 1)], 32)
    assert trainer.train_window([batch]) is not None  # fp16 works, at first
    before = everything(trainer)
    # Then every fp16 step overflows (as the critic's loss of a diverging fp16 run does); fp32 does not.
    real = objective.discriminator_loss
    overflow = {"fp16"}
    monkeypatch.setattr(objective, "discriminator_loss",
                        lambda r, f: real(r, f) * (math.inf if trainer.precision in overflow else 1.0))
    for _ in range(3):
        assert trainer.train_window([batch]) is None
    assert "3 non-finite fp16 steps in a row at step 1: going on in fp32" in capsys.readouterr().out
    assert trainer.precision == "fp32" and not trainer.scaler.is_enabled() and trainer.fp32_from_step == 1
    assert trainer.bad_steps == 0 and trainer.skipped_steps == 3
    assert_same(before, everything(trainer))
    # The night goes on, in fp32, and the checkpoint says so.
    assert trainer.train_window([batch]) is not None and trainer.step == 2
    state = trainer.state_dict()
    assert state["fp32_from_step"] == 1

    # A resumed run stays in fp32 (auto would pick fp16 again on that card), unless fp16 is asked for.
    resumed = fp16_trainer(tiny_model_dir)
    resumed.load_state_dict(state)
    assert resumed.precision == "fp32" and not resumed.scaler.is_enabled() and resumed.fp32_from_step == 1
    asked = fp16_trainer(tiny_model_dir, "--precision", "fp16")
    asked.load_state_dict(state)
    assert asked.precision == "fp16" and asked.scaler.is_enabled()

    # fp32 that keeps failing still stops the run, with the message.
    overflow.add("fp32")
    with pytest.raises(run_errors.TrainingError, match="3 non-finite training steps in a row"):
        for _ in range(3):
            trainer.train_window([batch])


def four_windows(tiny_clips):
    return [[clip_data.collate([(tiny_clips, (4 * w + i) % len(tiny_clips)) for i in range(4)], 32)] for w in range(4)]


def test_out_of_memory_trains_the_same_clips_in_pieces_as_a_run_split_from_the_start(tiny_model_dir, tiny_clips,
                                                                                     monkeypatch, capsys):
    windows = four_windows(tiny_clips)
    real_forward = objective.generator_forward
    oom_from_step = [math.inf]

    def forward(model, batch, segment_frames):
        # The card holds 2 clips a micro-batch, from step 3 on (a longer batch, the desktop taking memory).
        if len(batch["frames"]) > 2 and trainer.step >= oom_from_step[0]:
            torch.rand(8)  # partway through the forward: its noise is drawn already
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(model, batch, segment_frames)
    monkeypatch.setattr(objective, "generator_forward", forward)

    torch.manual_seed(1)
    trainer = tiny_trainer(tiny_model_dir, "--lr", "1e-3", steps=100)
    oom_from_step[0] = 2
    survived = [trainer.train_window(w) for w in windows]
    assert "out of GPU memory at step 3 in the critic's pass: micro-batches of 4 clips now train in 2 pieces" \
        in capsys.readouterr().out
    assert trainer.step == 4 and trainer.splits == {4: 2} and trainer.oom_splits == 1
    survived_weights, state = weights(trainer), trainer.state_dict()

    # The same run with the split from step 3 on, and no out of memory: the same updates, exactly.
    oom_from_step[0] = math.inf
    torch.manual_seed(1)
    trainer = tiny_trainer(tiny_model_dir, "--lr", "1e-3", steps=100)
    reference = []
    for k, w in enumerate(windows):
        if k == 2:
            trainer.splits = {4: 2}
        reference.append(trainer.train_window(w))
    assert survived == reference
    assert all(torch.equal(survived_weights[k], v) for k, v in weights(trainer).items())
    # The split is part of the run: a resumed run keeps it.
    resumed = tiny_trainer(tiny_model_dir, "--lr", "1e-3", steps=100)
    resumed.load_state_dict(state)
    assert resumed.splits == {4: 2} and resumed.oom_splits == 1


def test_out_of_memory_after_the_critic_stepped_runs_only_the_generator_again(tiny_model_dir, tiny_clips,
                                                                               monkeypatch):
    batch = four_windows(tiny_clips)[0]
    torch.manual_seed(1)
    plain = tiny_trainer(tiny_model_dir, "--lr", "1e-3", steps=100)
    plain.train_window(batch)
    torch.manual_seed(1)
    trainer = tiny_trainer(tiny_model_dir, "--lr", "1e-3", steps=100)
    real_critic = trainer.generator_critic

    def generator_critic(out):
        if out["audio"].size(0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_critic(out)
    monkeypatch.setattr(trainer, "generator_critic", generator_critic)
    terms = trainer.train_window(batch)
    assert terms is not None and trainer.step == 1 and trainer.splits == {4: 2}
    # The critic stepped once, as the run without the out of memory stepped it: the same weights.
    assert all(s["step"] == 1 for s in trainer.opt_d.state.values())
    assert all(torch.equal(v, plain.disc.state_dict()[k]) for k, v in trainer.disc.state_dict().items())
    assert all(s["step"] == 1 for s in trainer.opt_g.state.values()) and trainer.sched_g.last_epoch == 1


def test_out_of_memory_with_one_clip_a_piece_stops_with_one_line(tiny_model_dir, tiny_clips, monkeypatch):
    monkeypatch.setattr(objective, "generator_forward",
                        lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    trainer = tiny_trainer(tiny_model_dir, "--lr", "1e-3", steps=100)
    with pytest.raises(run_errors.TrainingError, match="out of GPU memory at step 1 in the critic's pass: not even "
                                                       "one clip fits"):
        trainer.train_window(four_windows(tiny_clips)[0])
    assert trainer.splits == {4: 4}


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "2e-3", "--max_bad_steps", "2")
    batch = short_batch(tiny_clips, 2)
    before = {k: v.clone() for k, v in list(trainer.model.state_dict().items()) + list(
        trainer.disc.state_dict().items())}
    # Only the generator's loss is NaN: the critic has already stepped (VITS's order) and keeps its update;
    # the generator's update is dropped.
    monkeypatch.setattr(objective, "mel_slice_loss", lambda out, sr: torch.tensor(float("nan")))
    assert trainer.train_window([batch]) is None
    assert (trainer.step, trainer.skipped_steps) == (0, 1)
    after = dict(list(trainer.model.state_dict().items()) + list(trainer.disc.state_dict().items()))
    assert all(torch.equal(before[k], after[k]) for k in trainer.model.state_dict())
    assert not all(torch.equal(before[k], after[k]) for k in trainer.disc.state_dict())
    assert all(p.grad is None for p in itertools.chain(trainer.model.parameters(), trainer.disc.parameters()))
    with pytest.raises(run_errors.TrainingError, match="2 non-finite training steps in a row"):
        trainer.train_window([batch])
    assert trainer.skipped_steps == 2


def test_a_step_that_raises_a_numeric_error_is_a_skipped_step(tiny_model_dir, monkeypatch, capsys):
    trainer = tiny_trainer(tiny_model_dir, "--max_bad_steps", "2")

    def spline_fails(*args, **kwargs):
        raise RuntimeError("Input to the spline is outside its domain")

    monkeypatch.setattr(objective, "generator_forward", spline_fails)
    batch = dict(audio=torch.zeros(1, 8192))
    assert trainer.train_window([batch]) is None
    assert trainer.skipped_steps == 1 and trainer.step == 0
    assert all(p.requires_grad for p in trainer.disc.parameters())
    with pytest.raises(run_errors.TrainingError, match="2 non-finite training steps in a row"):
        trainer.train_window([batch])
    assert "RuntimeError: Input to the spline" in capsys.readouterr().out


def test_a_step_reports_each_networks_gradient_norm_before_clipping(tiny_model_dir, tiny_clips, monkeypatch):
    # Clipping binds: the norm is the raw one.
    trainer = tiny_trainer(tiny_model_dir, "--lr", "2e-5", "--grad_clip", "1e-3")
    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recorded(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in parameters if p.grad is not None)))
        return real_clip(parameters, max_norm, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded)
    trainer.schedule(10)
    terms = trainer.train_window([clip_data.collate([(tiny_clips, 0), (tiny_clips, 1)], 32)])
    assert len(norms) == 2 and norms[0] > 1e-3 and norms[1] > 1e-3
    assert terms["grad_norm_d"] == pytest.approx(norms[0], rel=1e-5)
    assert terms["grad_norm_g"] == pytest.approx(norms[1], rel=1e-5)


def test_learning_rate_warms_up_then_decays_and_the_critics_solo_phase_spares_the_generator(tiny_model_dir):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "1e-3", "--warmup_steps", "3")
    trainer.schedule(12, d_warmup_steps=4)
    # No forward and no gradients: only the schedule moves.
    trainer.generator_outputs = lambda batch, grad=True: None
    trainer.critic_backward = lambda batch, accum, keep_graph: (None, dict(d=0.0))
    trainer.generator_backward = lambda out, accum: dict(g=0.0)
    used_g, used_d = [], []
    for step in range(12):
        used_d.append(trainer.opt_d.param_groups[0]["lr"])
        if step >= 4:
            used_g.append(trainer.opt_g.param_groups[0]["lr"])
        trainer.train_window([{}], d_only=step < 4)

    def warmup_cosine(step, warmup, total):
        if step < warmup:
            return 1e-3 * step / warmup
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    # The critic trains its 4 solo steps at its full rate, then decays; the generator warms up after them.
    assert used_d == pytest.approx([1e-3] * 4 + [warmup_cosine(s - 4, 0, 8) for s in range(4, 12)], abs=1e-12)
    assert used_g == pytest.approx([warmup_cosine(s, 3, 8) for s in range(8)], abs=1e-12)


def test_a_fresh_critic_trains_alone_at_its_own_full_rate_then_decays(tiny_model_dir):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "2e-5", "--warmup_steps", "10")
    trainer.critic_lr = vits_trainer.critic_learning_rate(trainer.args, fresh=True)
    assert trainer.critic_lr == 2e-4
    total, solo = 100, 20
    trainer.schedule(total, d_warmup_steps=solo)
    critic, generator = [], []
    for step in range(total):
        critic.append(trainer.sched_d.get_last_lr()[0])
        trainer.sched_d.step()
        if step >= solo:
            generator.append(trainer.sched_g.get_last_lr()[0])
            trainer.sched_g.step()
    # Solo phase: the full 2e-4 from the first step (VITS's rate from scratch), no warm-up ramp.
    assert critic[:solo] == pytest.approx([2e-4] * solo)
    # Then a cosine decay to 0 at the end of the night.
    for step in (20, 60, 90):
        assert critic[step] == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * (step - solo) / (total - solo))))
    # The generator keeps its own warm-up, after the solo phase, at --lr.
    assert generator[:3] == pytest.approx([0.0, 2e-6, 4e-6])
    assert max(generator) == pytest.approx(2e-5)
    # A pretrained critic runs at --lr unless --d_lr says otherwise.
    assert vits_trainer.critic_learning_rate(trainer.args, fresh=False) == 2e-5
    assert vits_trainer.critic_learning_rate(training_flags.parse(["--d_lr", "5e-5"]), fresh=True) == 5e-5
    assert vits_trainer.critic_learning_rate(training_flags.parse(["--lr", "5e-4"]), fresh=True) == 5e-4
