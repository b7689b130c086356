"""The voice and its critic: loading the pretrained VitsModel, setting it up for training, exporting it
in the transformers format, torch files written atomically (a full disk kept as its OSError), and the HiFi-GAN multi-period + scale discriminator with the file formats it
is read from (original MMS/VITS D_*.pth, finetune-hf-vits, our discriminator.pt)."""

import os
import re
import shutil

import huggingface_hub
import safetensors.torch
import torch
import torch.nn.functional as F
from huggingface_hub import errors as hub_errors
from torch import nn
from transformers import VitsModel

from voicetune.common import distributed
from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.common import speech
from voicetune.voice import speakers


def weight_norm(module):
    return nn.utils.parametrizations.weight_norm(module)


def load_voice(name_or_dir):
    missing = speech.missing_local_voice(name_or_dir)
    if missing:
        raise run_errors.TrainingError(f"--model: {missing}")
    try:
        model = VitsModel.from_pretrained(name_or_dir)
        tokenizer = speech.load_tokenizer(name_or_dir)
    except Exception as err:  # a damaged file raises whatever its reader raises (UnpicklingError, SafetensorError)
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise run_errors.TrainingError(f"--model {name_or_dir}: cannot load a VITS model and tokenizer "
                                       f"({type(err).__name__}: {first_line})") from err
    return model, tokenizer


def prepare_for_training(model):
    """As the original trainer: no layer drop, weight norm on the HiFi-GAN decoder (removed for saving)."""
    model.config.layerdrop = 0.0
    model.text_encoder.encoder.layerdrop = 0.0
    if not nn.utils.parametrize.is_parametrized(model.decoder.upsampler[0]):
        model.decoder.apply_weight_norm()
    model.train()
    return model


def inference_copy(model):
    """A CPU copy of the generator without decoder weight norm, as the released MMS voices are saved.

    (Removing the parametrization from a deepcopy would also strip it from the original: the
    parametrized class is shared between copies.)
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if not (k.startswith("decoder.") and ".parametrizations.weight." in k)}
    for name, module in model.decoder.named_modules():
        if nn.utils.parametrize.is_parametrized(module, "weight"):
            state[f"decoder.{name}.weight"] = module.weight.detach().cpu()
    export = VitsModel(model.config)
    export.load_state_dict(state)
    return export.eval()


def replace_dir(tmp_dir, final_dir):
    """Swap a fully written folder into place, so a reader never sees a half-written model; tmp_dir None:
    only mend a swap that was interrupted.

    Windows cannot os.replace onto an existing folder, so the old one is first moved aside to
    final_dir + ".old", the new one renamed into place, and only then the old one deleted. A crash (or a
    killed process) between the two renames leaves final_dir missing and its one complete copy in .old; so
    before anything else a .old without final_dir is put back, and a .old beside final_dir (a swap that ended
    before deleting it: final_dir is the new, complete one) is deleted. A rename that fails (a full disk can
    refuse the new directory entry) puts the old folder back before raising.
    """
    old = final_dir + ".old"
    if os.path.isdir(old):
        if os.path.isdir(final_dir):
            shutil.rmtree(old)
        else:
            os.replace(old, final_dir)
    if tmp_dir is None:
        return
    moved_aside = os.path.isdir(final_dir)
    if moved_aside:
        os.replace(final_dir, old)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        if moved_aside:
            os.replace(old, final_dir)
        raise
    if os.name != "nt":  # the renames on disk before the old copy goes (Windows cannot open a folder)
        try:
            fd = os.open(os.path.dirname(os.path.abspath(final_dir)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass  # a file system that cannot fsync a folder: the swap itself is done
    shutil.rmtree(old, ignore_errors=True)


class FileWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch reports only "unexpected pos"."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        self.f.flush()


def atomic_torch_save(obj, path):
    with run_folder.written_atomically(path) as f:
        writer = FileWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error:
                raise writer.error from None
            raise


def export_voice(model, tokenizer, discriminator, out_dir, speaker_table=None):
    """save_pretrained (loadable by pipeline('text-to-speech')) + discriminator.pt (+ speakers.json naming
    the speaker ids of a multi-speaker voice, from speakers.choose_speakers's table), atomically.

    Written into a hidden temp folder beside out_dir, checked, flushed to disk, then swapped in by
    replace_dir. Whatever fails (a full disk while writing any of the files, or in the renames), the model
    saved in out_dir before stays there complete, no temp folder is left, and the caller gets an OSError
    naming out_dir and the cause, which the commands print as one line. The writers each report a full disk
    their own way: open()/write() (configs, tokenizer) an OSError without the file's name, safetensors (the
    weights) a SafetensorError "... (os error 28)", torch.save a RuntimeError "unexpected pos" (hence
    atomic_torch_save, which keeps the OSError).
    """
    import errno

    out_dir = os.path.abspath(out_dir)
    tmp = run_folder.temp_name(out_dir)
    doing = "while making the folder"
    try:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        replace_dir(None, out_dir)  # an interrupted swap's model back in place first: kept if this save fails
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own, left by a failed clean-up
        os.mkdir(tmp)
        doing = "while writing config.json and model.safetensors"
        inference_copy(model).save_pretrained(tmp)
        doing = "while writing the tokenizer"
        tokenizer.save_pretrained(tmp)
        doing = "while writing discriminator.pt"
        atomic_torch_save(discriminator.state_dict(), os.path.join(tmp, "discriminator.pt"))
        if speaker_table:
            doing = "while writing speakers.json"
            speakers.write_table(tmp, speaker_table)
        doing = "after writing the new model"  # a writer that swallowed its error must not replace a good model
        missing = run_files.voice_missing(tmp, run_files.VOICE_FILES + ("discriminator.pt",))
        if missing:
            raise OSError(errno.EIO, missing)
        doing = "while flushing the new model to disk"
        run_folder.open_modes(tmp)
        run_folder.sync_files(tmp)
        doing = "while putting the new model in place"
        replace_dir(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not keep a hidden half-written copy
        code = err.errno if isinstance(err, OSError) else None
        found = re.search(r"os error (\d+)", str(err)) if code is None and isinstance(err, Exception) else None
        code = code or (int(found.group(1)) if found else None)
        if not code:
            raise
        cause = err.strerror if isinstance(err, OSError) and err.strerror else os.strerror(code)
        kept = "the model saved there before is kept" if os.path.isdir(out_dir) else "no model is saved there"
        raise OSError(code, f"{cause} {doing}; {kept}", out_dir) from err


def conv_stack(convs, conv_post, x):
    """Leaky-ReLU conv stack of a HiFi-GAN sub-discriminator -> (flat logits, every layer's features)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), 0.1)
        features.append(x)
    x = conv_post(x)
    features.append(x)
    return torch.flatten(x, 1), features


def scaled(channels, max_channels):
    return max(1, channels * max_channels // 1024)


class PeriodDiscriminator(nn.Module):
    def __init__(self, period, max_channels=1024):
        super().__init__()
        self.period = period
        chans = [1] + [scaled(c, max_channels) for c in (32, 128, 512, 1024, 1024)]
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(chans[i], chans[i + 1], (5, 1), (3, 1) if i < 4 else 1, padding=(2, 0)))
            for i in range(5)])
        self.conv_post = weight_norm(nn.Conv2d(chans[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x):
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), "reflect")
        return conv_stack(self.convs, self.conv_post, x.view(b, c, -1, self.period))


class ScaleDiscriminator(nn.Module):
    def __init__(self, max_channels=1024):
        super().__init__()
        c = [1] + [scaled(n, max_channels) for n in (16, 64, 256, 1024, 1024, 1024)]
        groups = [1] + [scaled(g, max_channels) for g in (4, 16, 64, 256)] + [1]
        kernels, strides = (15, 41, 41, 41, 41, 5), (1, 4, 4, 4, 4, 1)
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv1d(c[i], c[i + 1], kernels[i], strides[i], groups=groups[i], padding=kernels[i] // 2))
            for i in range(6)])
        self.conv_post = weight_norm(nn.Conv1d(c[-1], 1, 3, 1, padding=1))

    def forward(self, x):
        return conv_stack(self.convs, self.conv_post, x)


class VitsDiscriminator(nn.Module):
    """The VITS/MMS critic: one scale discriminator and period discriminators 2, 3, 5, 7, 11.

    `max_channels` below 1024 shrinks every layer alike, for quick trials with tiny generators only:
    pretrained MMS discriminators have 1024.
    """

    def __init__(self, periods=(2, 3, 5, 7, 11), max_channels=1024):
        super().__init__()
        self.max_channels = max_channels
        self.discriminators = nn.ModuleList([ScaleDiscriminator(max_channels)]
                                            + [PeriodDiscriminator(p, max_channels) for p in periods])

    def forward(self, audio):
        """[B, 1, T] -> (list of logits, list of feature lists), one entry per sub-discriminator."""
        outputs = [d(audio) for d in self.discriminators]
        return [o[0] for o in outputs], [o[1] for o in outputs]


def mms_discriminator_state(raw):
    """Rename an original MMS/VITS D_*.pth or a finetune-hf-vits state dict (weight norm or plain weights)
    to our parameter names."""
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    renamed = {}
    for key, value in state.items():
        key = key.replace("module.", "", 1) if key.startswith("module.") else key
        if "discriminators." not in key:
            continue  # some MMS files carry generator weights too
        key = key[key.index("discriminators."):].replace("final_conv", "conv_post")
        key = key.replace(".weight_g", ".parametrizations.weight.original0")
        key = key.replace(".weight_v", ".parametrizations.weight.original1")
        if key.endswith(".weight"):
            # Weight norm removed before saving (finetune-hf-vits): every layer here is weight-normed, and
            # g = |w| over all dims but 0, v = w gives back exactly the same weight.
            base = key[:-len("weight")] + "parametrizations.weight."
            renamed[base + "original0"] = torch.linalg.vector_norm(value, dim=list(range(1, value.dim())),
                                                                   keepdim=True)
            key = base + "original1"
        renamed[key] = value
    return renamed


def load_discriminator(path):
    """A critic file of any of the layouts mms_discriminator_state reads, read without running code:
    `.safetensors` with safetensors, everything else with torch.load(weights_only=True)."""
    try:
        if path.endswith(".safetensors"):
            raw = safetensors.torch.load_file(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise run_errors.TrainingError(f"--discriminator {path}: not a readable checkpoint ({err})") from err
    return discriminator_from_state(mms_discriminator_state(raw), path)


def discriminator_from_state(state, path):
    """The VitsDiscriminator that `state` (our parameter names) fits, with those weights."""
    # The widest layer of the first period discriminator tells the size it was built with.
    width = state.get("discriminators.1.convs.4.parametrizations.weight.original1")
    disc = VitsDiscriminator(max_channels=width.shape[0] if width is not None else 1024)
    expected = disc.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or extra or shapes:
        raise run_errors.TrainingError(f"--discriminator {path}: does not fit the VITS discriminator; "
                                       f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                                       f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}, "
                                       f"wrong shape {shapes[:8]}")
    disc.load_state_dict(state)
    return disc


# Every MMS language's full VITS checkpoint, critic included, lies in one Hub repo (finetune-hf-vits
# fetches the critic from there too).
MMS_CHECKPOINTS = "facebook/mms-tts"
MMS_VOICE = re.compile(r"facebook/mms-tts-([\w.-]+)")


def find_discriminator(choice, model):
    """(critic file or None for a fresh critic, the line that says which and why) for --discriminator.

    choice: a path, "none" (a fresh critic) or "auto": the discriminator.pt beside a local --model folder;
    for a Hub voice facebook/mms-tts-<lang>, MMS's own critic full_models/<lang>/D_100000.pth of
    facebook/mms-tts through the Hugging Face cache (offline once cached, HF_HUB_OFFLINE=1); else fresh.
    Under torchrun rank 0 downloads first and the other processes read its cached copy.
    """
    if choice not in ("auto", "none"):
        return choice, f"critic: {choice}"
    if choice == "none":
        return None, "critic: a fresh one (--discriminator none), trained alone first"
    beside = os.path.join(model, "discriminator.pt")
    match = MMS_VOICE.fullmatch(model)
    if os.path.isfile(beside):
        return beside, f"critic: {beside}, saved beside --model"
    if os.path.isdir(model):
        why = f"no discriminator.pt beside --model {model}"
    elif not match:
        why = f"--model {model} is not an MMS voice (facebook/mms-tts-<lang>) and has no discriminator.pt"
    else:
        filename = f"full_models/{match.group(1)}/D_100000.pth"
        with distributed.main_process_first():
            try:
                path = huggingface_hub.hf_hub_download(MMS_CHECKPOINTS, filename)
                return path, f"critic: MMS's own, {MMS_CHECKPOINTS}/{filename} ({path})"
            except hub_errors.LocalEntryNotFoundError:
                why = f"{MMS_CHECKPOINTS}/{filename} is not in the Hugging Face cache and the Hub is offline"
            except (hub_errors.EntryNotFoundError, hub_errors.RepositoryNotFoundError):
                why = f"MMS publishes no critic for this voice ({MMS_CHECKPOINTS}/{filename} is not on the Hub)"
            except Exception as err:  # noqa: BLE001 - the Hub unreachable or cut off mid-download (httpx's
                # errors are no OSError), a full disk, a read-only cache: auto never stops the run over it.
                cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
                why = (f"{MMS_CHECKPOINTS}/{filename} could not be fetched or cached ({type(err).__name__}"
                       + (f": {cause}" if cause else "") + ")")
    return None, f"critic: a fresh one, trained alone first ({why})"


def critic_for_run(args, resume):
    """(critic, the file it was read from or None for a fresh one), printing which and why. A resumed run's
    critic is the checkpoint's, with its learning rate and schedule (loaded with the rest of the run);
    nothing is fetched."""
    path, state = resume
    if path:
        disc = discriminator_from_state(state["trainer"]["disc"], path)
        print(f"critic: the checkpoint's, {path}")
        return disc, path
    disc_path, line = find_discriminator(args.discriminator, args.model)
    print(line)
    if disc_path is None:
        return VitsDiscriminator(max_channels=args.disc_channels), None
    return load_discriminator(disc_path), disc_path
