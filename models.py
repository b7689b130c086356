"""The voice and its critic: loading the pretrained VitsModel, setting it up for training, exporting it
in the transformers format, and the HiFi-GAN multi-period + scale discriminator with the file formats it
is read from (original MMS/VITS D_*.pth, finetune-hf-vits, our discriminator.pt)."""

import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn
from transformers import VitsModel

import run_errors
import run_folder
import speech


def weight_norm(module):
    return nn.utils.parametrizations.weight_norm(module)


def load_voice(name_or_dir):
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
    """Swap a fully written folder into place, so a reader never sees a half-written model."""
    old = final_dir + ".old"
    if os.path.isdir(final_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_voice(model, tokenizer, discriminator, out_dir):
    """save_pretrained (loadable by pipeline('text-to-speech')) + discriminator.pt, atomically."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = run_folder.temp_name(os.path.abspath(out_dir))
    os.mkdir(tmp)
    try:
        inference_copy(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(discriminator.state_dict(), os.path.join(tmp, "discriminator.pt"))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not keep a hidden half-written copy
        raise


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
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise run_errors.TrainingError(f"--discriminator {path}: not a readable checkpoint ({err})") from err
    state = mms_discriminator_state(raw)
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
