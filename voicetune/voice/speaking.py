"""Speaking with the torch voice: the sentence settings set where VitsModel reads them, a text as audio, and
`TorchVoice`, the loaded voice speak_lines.speak_files speaks with (as it speaks with onnx_voice.OnnxVoice).

transformers copies speaking_rate, noise_scale and noise_scale_duration from the config into model attributes
once, at load; VitsModel.forward reads the attributes, so changing `model.config.*` afterwards does nothing.
"""

import contextlib
import math

import torch

from voicetune.common import distributed
from voicetune.common import run_errors
from voicetune.common import speech
from voicetune.voice import models
from voicetune.voice import spectrogram

SETTINGS = ("speaking_rate", "noise_scale", "noise_scale_duration")
SAMPLE_MAX_SECONDS = 30.0  # longest listening sample: a longer one means the durations diverged


def load(model_dir, **settings):
    """(model in eval mode, tokenizer) with each setting given (not None) set where forward reads it."""
    model, tokenizer = models.load_voice(model_dir)
    model.eval()
    for name, value in settings.items():
        if name not in SETTINGS:
            raise TypeError(f"unknown setting {name}")
        if value is not None:
            setattr(model, name, value)
    return model, tokenizer


def check_speaker(config, speaker_id):
    """The speaker id forward is given: None for a single voice; a multi-speaker voice needs one in range."""
    if config.num_speakers <= 1:
        if speaker_id not in (None, 0):
            raise run_errors.TrainingError(f"--speaker_id {speaker_id}: this voice has one speaker")
        return None
    if speaker_id is None:
        raise run_errors.TrainingError(f"this voice has {config.num_speakers} speakers: choose one with "
                                       f"--speaker_id 0-{config.num_speakers - 1}")
    if not 0 <= speaker_id < config.num_speakers:
        raise run_errors.TrainingError(f"--speaker_id {speaker_id}: this voice has speakers 0-"
                                       f"{config.num_speakers - 1}")
    return speaker_id


@torch.no_grad()
def say(model, tokenizer, sentence, speaker_id=None):
    """One cleaned sentence as float32 audio: the voice's exact output, nothing added."""
    ids = torch.tensor([speech.token_ids(tokenizer, sentence)], device=model.device)
    out = model(input_ids=ids, speaker_id=speaker_id)
    return out.waveform[0, :int(out.sequence_lengths[0])].float().cpu().numpy()


@contextlib.contextmanager
def capped_durations(model, max_frames):
    """Inside the block the voice speaks each sentence in at most `max_frames` frames: durations that ask
    for more are scaled down together (NaN ones count as one frame), by a hook on the duration predictor.

    A diverging model can predict hours of audio for one sentence (or NaN durations), and decoding them
    takes gigabytes and minutes; the listening sample of such a model is worthless anyway.
    """
    def hook(module, inputs, log_duration):
        log_duration = torch.nan_to_num(log_duration, nan=0.0, posinf=math.log(max_frames), neginf=0.0)
        # frames = sum(exp(log_duration)) / speaking_rate, as VitsModel turns log-durations into frames
        excess = torch.logsumexp(log_duration.flatten(1), dim=1) - math.log(max_frames * model.speaking_rate)
        return log_duration - excess.clamp(min=0)[:, None, None]

    handle = model.duration_predictor.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class TorchVoice:
    """A loaded transformers voice that speaks: its speaker, and (for listening samples of a voice in
    training) its durations capped at max_seconds a sentence."""

    def __init__(self, model, tokenizer, speaker_id=None, max_seconds=None):
        self.model, self.tokenizer, self.speaker_id = model, tokenizer, speaker_id
        self.sampling_rate = model.config.sampling_rate
        self.max_frames = None if max_seconds is None else int(max_seconds * self.sampling_rate / spectrogram.HOP)

    @classmethod
    def load(cls, model_dir, speaker_id=None, device="cpu", max_seconds=None, **settings):
        """The voice in `model_dir` with its speaking settings (SETTINGS, None: the voice's own) on `device`;
        speaker_id checked against its speakers (check_speaker)."""
        model, tokenizer = load(model_dir, **settings)
        model.to(distributed.resolve_device(device))
        return cls(model, tokenizer, check_speaker(model.config, speaker_id), max_seconds)

    @contextlib.contextmanager
    def seeded(self, seed):
        """Inside the block the voice's noise is drawn from `seed` (the caller's random state and the model's
        training mode are untouched)."""
        was_training = self.model.training
        self.model.eval()
        device = self.model.device
        capped = capped_durations(self.model, self.max_frames) if self.max_frames else contextlib.nullcontext()
        try:
            with capped, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                yield
        finally:
            self.model.train(was_training)

    def say(self, sentence):
        return say(self.model, self.tokenizer, sentence, self.speaker_id)
