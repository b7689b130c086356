"""models.py: the voice saved and loaded (pipeline, permissions, damaged files), and the critic a run
starts from: every file format, MMS's own found in a Hugging Face cache laid out as huggingface_hub lays it
out, offline, and a fresh one with one line where MMS's cannot be fetched or cached."""

import errno
import filelock
import httpx2
import json
import os
import re
import shutil
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import pipeline, VitsModel

from voicetune.common import run_errors
from voicetune.common import speech
from voicetune.night import checkpoints
from voicetune.night import training_flags
from voicetune.voice import models
from conftest import effective_weights, hub_cache, ROOT, tiny_trainer


def test_saved_model_loads_and_synthesises_with_pipeline(tiny_model_dir, tmp_path):
    trainer, tokenizer = tiny_trainer(tiny_model_dir), speech.load_tokenizer(tiny_model_dir)
    out = str(tmp_path / "voice")
    models.export_voice(trainer.model, tokenizer, trainer.disc, out)
    # The exported voice is the trained one: same speech for the same noise (decoder weight norm folded).
    ids = torch.tensor([speech.token_ids(tokenizer, "Roj baş, tu çawa yî?")])
    waveforms = []
    for model in (trainer.model, VitsModel.from_pretrained(out)):
        torch.manual_seed(0)
        with torch.no_grad():
            waveforms.append(model.eval()(input_ids=ids).waveform)
    torch.testing.assert_close(waveforms[1], waveforms[0], rtol=0, atol=1e-5)
    spoken = pipeline("text-to-speech", model=out, device="cpu")("Roj baş, tu çawa yî?")
    assert spoken["sampling_rate"] == 16000
    assert spoken["audio"].size > 0 and np.all(np.isfinite(spoken["audio"]))
    # The trainer keeps its decoder weight norm after saving, and the critic reloads.
    assert torch.nn.utils.parametrize.is_parametrized(trainer.model.decoder.upsampler[0])
    assert models.load_discriminator(os.path.join(out, "discriminator.pt")).max_channels == 64


def test_exported_models_have_ordinary_permissions(trained_voice):
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(trained_voice).st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.skipif(os.name == "nt", reason="Windows files have no modes for group and others")
def test_every_file_of_an_exported_voice_gets_the_mode_the_umask_gives(tiny_model_dir, tmp_path):
    """model.safetensors too, which safetensors writes readable by its owner alone: a server running as another
    user loads the voice."""
    model, tokenizer = models.load_voice(tiny_model_dir)
    umask = os.umask(0o027)
    try:
        models.export_voice(model, tokenizer, models.VitsDiscriminator(max_channels=64), str(tmp_path / "voice"))
    finally:
        os.umask(umask)
    modes = {name: oct(os.stat(tmp_path / "voice" / name).st_mode & 0o777) for name in os.listdir(tmp_path / "voice")}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o640"}, modes


def test_a_damaged_model_file_is_one_line(tiny_model_dir, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, model)
    [weights] = [n for n in os.listdir(model) if n.endswith((".safetensors", ".bin"))]
    with open(os.path.join(model, weights), "wb") as f:
        f.write(b"\x80\x04not a model")
    with pytest.raises(run_errors.TrainingError, match=f"--model {re.escape(model)}: cannot load"):
        models.load_voice(model)


def critic_files(disc, folder):
    """`disc` saved as our discriminator.pt, an original MMS D_*.pth and finetune-hf-vits files with and
    without weight norm."""
    ours = disc.state_dict()
    weight_normed = {k.replace("parametrizations.weight.original0", "weight_g")
                      .replace("parametrizations.weight.original1", "weight_v"): v for k, v in ours.items()}
    plain = {k: v for k, v in weight_normed.items() if not k.endswith((".weight_g", ".weight_v"))}
    for name, module in disc.named_modules():
        if hasattr(module, "parametrizations"):
            plain[f"{name}.weight"] = module.weight.detach().clone()  # remove_weight_norm folds g * v / |v|
    hf = {k.replace("conv_post", "final_conv"): v for k, v in weight_normed.items()}
    hf_plain = {"discriminator." + k.replace("conv_post", "final_conv"): v for k, v in plain.items()}
    files = dict(ours=ours, mms={"model": {"module." + k: v for k, v in weight_normed.items()}, "iteration": 1},
                 hf_weight_norm=hf, hf_plain=hf_plain)
    for name, state in files.items():
        torch.save(state, os.path.join(folder, f"{name}.pt"))
    return {name: os.path.join(folder, f"{name}.pt") for name in files}


def test_every_kind_of_critic_file_loads_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    disc = models.VitsDiscriminator(max_channels=64)
    with torch.no_grad():
        for name, p in disc.named_parameters():
            if name.endswith("original0"):
                p.mul_(torch.rand_like(p) + 0.5)  # g no longer |v|: a lost g would show
    audio = torch.randn(2, 1, 4096) * 0.3
    with torch.no_grad():
        expected, _ = disc(audio)
    for kind, path in critic_files(disc, str(tmp_path)).items():
        loaded = models.load_discriminator(path)
        with torch.no_grad():
            logits, _ = loaded(audio)
        for a, b in zip(logits, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=kind)

    broken = torch.load(str(tmp_path / "mms.pt"), weights_only=True)
    del broken["model"]["module.discriminators.0.conv_post.bias"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(run_errors.TrainingError, match="missing.*discriminators.0.conv_post.bias"):
        models.load_discriminator(str(tmp_path / "broken.pth"))


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


# ----------------------------------------------------------- --discriminator auto that cannot fetch

MMS_FILE = "facebook/mms-tts/full_models/kmr-script_latin/D_100000.pth"


@pytest.mark.parametrize("failure, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "OSError: [Errno 28] No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/hf/hub/.locks"), "PermissionError: [Errno 13]"),
    (OSError(errno.EROFS, "Read-only file system"), "OSError: [Errno 30] Read-only file system"),
    (filelock.Timeout("/hf/hub/.locks/D_100000.pth.lock"), "Timeout: The file lock"),
    (httpx2.ConnectError("connection reset\nwhile reading the body"), "ConnectError: connection reset)"),
])
def test_a_critic_that_cannot_be_fetched_or_cached_gives_a_fresh_one_and_one_line(failure, cause, monkeypatch,
                                                                                   capsys):
    def failing_download(repo_id, filename, **kwargs):
        assert f"{repo_id}/{filename}" == MMS_FILE
        raise failure
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    args = training_flags.parse(["--model", "facebook/mms-tts-kmr-script_latin", "--disc_channels", "64"])
    disc, path = models.critic_for_run(args, (None, None))
    assert path is None and isinstance(disc, models.VitsDiscriminator) and disc.max_channels == 64
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1
    line = printed[0]
    assert line.startswith(f"critic: a fresh one, trained alone first ({MMS_FILE} could not be fetched or cached (")
    assert cause in line
