"""The night on the user's card: the precision auto picks, the critic a run starts from (found in a
Hugging Face cache laid out as huggingface_hub lays it out, offline), the fresh critic's learning rate,
an alignment fp16 autocast cannot break, gradient norms in the log, and short clips' mel targets."""

import json
import math
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import safetensors.torch
import torch

import checkpoints
import clip_data
import models
import objective
import spectrogram
import training_flags
import vits_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ----------------------------------------------------------------------------------------------------
# Precision

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


# ----------------------------------------------------------------------------------------------------
# An alignment fp16 cannot break

def sharp_prior_case():
    """z_p, m_p, logs_p, masks with a sharp prior (sigma 0.02) whose log-likelihood products pass 65504."""
    gen = torch.Generator().manual_seed(0)
    b, c, tokens, frames = 2, 16, 7, 40
    m_p = 3 * torch.randn(b, c, tokens, generator=gen)
    logs_p = torch.full((b, c, tokens), math.log(0.02))
    z_p = 3 * torch.randn(b, c, frames, generator=gen)
    x_mask = torch.ones(b, 1, tokens)
    y_mask = torch.ones(b, 1, frames)
    x_mask[1, :, 5:] = 0
    y_mask[1, :, 31:] = 0
    return z_p, m_p, logs_p, x_mask, y_mask


def test_the_alignment_and_prior_expansion_under_fp16_autocast_equal_fp32():
    z_p, m_p, logs_p, x_mask, y_mask = sharp_prior_case()
    # The case is one fp16 breaks: its log-likelihood product leaves fp16's range.
    s_p_sq_r = torch.exp(-2 * logs_p)
    assert torch.matmul((m_p * s_p_sq_r).transpose(1, 2), z_p).abs().max() > 65504
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(torch.matmul(s_p_sq_r.transpose(1, 2), -0.5 * z_p.pow(2))).all()
    path32 = objective.monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask)
    with torch.autocast("cpu", dtype=torch.float16):
        path16 = objective.monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask)
        m16, logs16 = objective.expand_prior(m_p, logs_p, path16)
    assert torch.equal(path16, path32)
    assert m16.dtype == torch.float32 and torch.equal(m16, torch.matmul(m_p, path32))
    assert torch.equal(logs16, torch.matmul(logs_p, path32))


# ----------------------------------------------------------------------------------------------------
# Gradient norms and short clips

def tiny_trainer(tiny_model_dir, *flags):
    torch.manual_seed(0)
    model, tokenizer = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    args = training_flags.parse(["--batch_size", "2", "--grad_accum", "1", "--disc_channels", "64",
                                 "--warmup_steps", "0", *flags])
    return vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"),
                                    "fp32"), tokenizer


def test_a_step_reports_each_networks_gradient_norm_before_clipping(tiny_model_dir, tiny_clips, monkeypatch):
    trainer, _ = tiny_trainer(tiny_model_dir, "--grad_clip", "1e-3")  # clipping binds: the norm is the raw one
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


def test_a_clip_shorter_than_the_slice_is_scored_against_the_mel_of_silence(tiny_model_dir, tiny_clips):
    trainer, _ = tiny_trainer(tiny_model_dir)
    short = tiny_clips.subset([0])
    frames = 10
    short.audio = [short.audio[0][:frames * spectrogram.HOP]]
    short.mels = [short.mels[0][:, :frames]]
    batch = clip_data.collate([(short, 0)], 32)
    out = objective.generator_forward(trainer.model, batch, 32)
    silence = spectrogram.mel_spectrogram(torch.zeros(1, 4 * spectrogram.HOP), 16000)[0, :, 0]
    assert silence.mean() == pytest.approx(-9.66, abs=0.01)
    torch.testing.assert_close(out["mel"][0, :, frames:], silence[:, None].expand(-1, 32 - frames))
    torch.testing.assert_close(out["mel"][0, :, :frames], torch.from_numpy(short.mels[0]).float())


# ----------------------------------------------------------------------------------------------------
# The fresh critic's learning rate

def test_a_fresh_critic_trains_alone_at_its_own_full_rate_then_decays(tiny_model_dir):
    trainer, _ = tiny_trainer(tiny_model_dir, "--lr", "2e-5", "--warmup_steps", "10")
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


def test_d_lr_is_checked_and_kept_on_resume():
    with pytest.raises(SystemExit):
        training_flags.parse(["--d_lr", "0"])
    saved = vars(training_flags.parse(["--d_lr", "1e-4"]))
    with pytest.raises(Exception, match=r"--d_lr 0.0002 \(the run has 0.0001\)"):
        checkpoints.check_resumed_flags(saved, training_flags.parse(["--d_lr", "2e-4"]), "c.pt")


# ----------------------------------------------------------------------------------------------------
# The critic a run starts from

def original_mms_file(disc, path):
    """`disc` saved as MMS's full_models/<lang>/D_100000.pth is: VITS's utils.save_checkpoint of
    {"model", "iteration", "optimizer", "learning_rate"}, weight norm as weight_g/weight_v, plus a
    generator key as some MMS files carry."""
    state = {}
    for key, value in disc.state_dict().items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        state[key.replace(".parametrizations.weight.original1", ".weight_v")] = value.clone()
    state["enc_p.emb.weight"] = torch.zeros(3, 4)
    torch.save(dict(model=state, iteration=100000, optimizer={}, learning_rate=2e-4), path)


def hub_cache(hf_home, repo, files):
    """Lay files into HF_HOME/hub as huggingface_hub caches a repo: refs/main naming a snapshot folder."""
    folder = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name, write in files.items():
        target = os.path.join(folder, "snapshots", COMMIT, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write(target)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF_HOME used offline, in this process as a child process would see it from the env."""
    hf_home = str(tmp_path / "hf_home")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.path.join(hf_home, "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hf_home


def effective_weights(disc):
    return {name: module.weight.detach().clone() for name, module in disc.named_modules()
            if hasattr(module, "parametrizations")}


def test_auto_finds_mms_own_critic_in_the_hub_cache_offline(offline_cache, tmp_path, capsys):
    torch.manual_seed(3)
    mms = models.VitsDiscriminator(max_channels=64)
    hub_cache(offline_cache, "facebook/mms-tts",
              {"full_models/tiny-lang/D_100000.pth": lambda p: original_mms_file(mms, p)})
    path, line = models.find_discriminator("auto", "facebook/mms-tts-tiny-lang")
    assert path.endswith(os.path.join("full_models", "tiny-lang", "D_100000.pth")) and os.path.isfile(path)
    assert "MMS's own" in line and path in line
    loaded = models.load_discriminator(path)
    for name, weight in effective_weights(mms).items():
        torch.testing.assert_close(effective_weights(loaded)[name], weight, rtol=0, atol=0)
    # A language MMS has no critic for in the cache, offline: a fresh critic, and the line says why.
    path, line = models.find_discriminator("auto", "facebook/mms-tts-other")
    assert path is None
    assert "fresh" in line and "not in the Hugging Face cache and the Hub is offline" in line
    # Not an MMS name, no discriminator.pt beside a local folder, or none asked for: fresh, no Hub call.
    assert models.find_discriminator("auto", "someone/voice")[0] is None
    assert models.find_discriminator("auto", str(tmp_path))[0] is None
    assert models.find_discriminator("none", "facebook/mms-tts-tiny-lang") == (
        None, "critic: a fresh one (--discriminator none), trained alone first")
    # A path is used as given; discriminator.pt beside a local --model wins over the Hub.
    torch.save(mms.state_dict(), tmp_path / "discriminator.pt")
    assert models.find_discriminator("auto", str(tmp_path))[0] == str(tmp_path / "discriminator.pt")


def test_a_finetune_hf_vits_safetensors_critic_loads_without_torch_load(tmp_path, monkeypatch):
    torch.manual_seed(4)
    disc = models.VitsDiscriminator(max_channels=64)
    # finetune-hf-vits saves the whole model with weight norm removed: plain weights, "discriminator." prefix.
    plain = {f"discriminator.{name}.weight": w for name, w in effective_weights(disc).items()}
    plain.update({f"discriminator.{k}": v for k, v in disc.state_dict().items() if k.endswith(".bias")})
    plain["text_encoder.embed_tokens.weight"] = torch.zeros(3, 4)
    path = str(tmp_path / "model.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in plain.items()}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a safetensors file is not read by torch.load"))
    loaded = models.load_discriminator(path)
    for name, weight in effective_weights(disc).items():
        torch.testing.assert_close(effective_weights(loaded)[name], weight, rtol=1e-6, atol=1e-7)


def test_a_resumed_run_takes_its_critic_from_the_checkpoint_and_asks_no_hub(monkeypatch, capsys):
    torch.manual_seed(5)
    disc = models.VitsDiscriminator(max_channels=64)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("no Hub call on resume"))
    args = training_flags.parse(["--model", "facebook/mms-tts-kmr-script_latin"])
    got, path = models.critic_for_run(args, ("run/checkpoints/checkpoint_epoch_2.pt",
                                             dict(trainer=dict(disc=disc.state_dict()))))
    assert path == "run/checkpoints/checkpoint_epoch_2.pt"
    assert "critic: the checkpoint's, run/checkpoints/checkpoint_epoch_2.pt" in capsys.readouterr().out
    for name, weight in effective_weights(disc).items():
        torch.testing.assert_close(effective_weights(got)[name], weight, rtol=0, atol=0)


def run_offline(hf_home, out, data_dir, *flags):
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_vits.py"), "--model",
                           "facebook/mms-tts-kmr-script_latin", "--data_dir", data_dir, "--output_dir", out,
                           "--device", "cpu", "--batch_size", "2", "--grad_accum", "1", "--num_workers", "1",
                           "--benchmark_samples", "0", "--eval_clips", "0", "--warmup_steps", "0", *flags],
                          capture_output=True, text=True, env=env, timeout=300)


def test_train_vits_with_no_critic_flag_starts_from_mms_critic_in_the_users_cache(tiny_model_dir, prepared_dataset,
                                                                                 tmp_path):
    torch.manual_seed(6)
    mms = models.VitsDiscriminator(max_channels=64)
    hf_home = str(tmp_path / "hf_home")
    voice = {name: (lambda p, name=name: shutil.copy(os.path.join(tiny_model_dir, name), p))
             for name in os.listdir(tiny_model_dir)}
    hub_cache(hf_home, "facebook/mms-tts-kmr-script_latin", voice)
    # Without the critic in the cache: one line says so, and a fresh critic trains alone first.
    run = run_offline(hf_home, str(tmp_path / "fresh"), prepared_dataset, "--max_steps", "1",
                      "--disc_channels", "64")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "critic: a fresh one, trained alone first (facebook/mms-tts/full_models/kmr-script_latin/" \
           "D_100000.pth is not in the Hugging Face cache and the Hub is offline)" in run.stdout
    # Its 200 solo steps are asked for; a run of one step keeps that step for the voice.
    with open(tmp_path / "fresh" / "run_config.json", encoding="utf-8") as f:
        info = json.load(f)
    assert (info["d_warmup_steps_asked"], info["d_warmup_steps"]) == (200, 0)
    state = checkpoints.read_checkpoint(checkpoints.newest_checkpoint(str(tmp_path / "fresh")))
    assert state["d_warmup_steps"] == 0
    # With it: trained from exactly that critic (--lr 0 leaves its weights as loaded), no solo warm-up.
    hub_cache(hf_home, "facebook/mms-tts",
              {"full_models/kmr-script_latin/D_100000.pth": lambda p: original_mms_file(mms, p)})
    run = run_offline(hf_home, str(tmp_path / "mms"), prepared_dataset, "--max_steps", "1", "--lr", "1e-30")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "critic: MMS's own, facebook/mms-tts/full_models/kmr-script_latin/D_100000.pth" in run.stdout
    state = checkpoints.read_checkpoint(checkpoints.newest_checkpoint(str(tmp_path / "mms")))
    assert state["d_warmup_steps"] == 0
    trained = models.discriminator_from_state(state["trainer"]["disc"], "checkpoint")
    for name, weight in effective_weights(mms).items():
        torch.testing.assert_close(effective_weights(trained)[name], weight, rtol=0, atol=1e-20)
    with open(tmp_path / "mms" / "run_config.json", encoding="utf-8") as f:
        assert json.load(f)["discriminator"].endswith("D_100000.pth")

