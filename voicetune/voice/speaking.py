"""Speaking with the torch voice: the sentence settings set where VitsModel reads them, and a text as audio.

transformers copies speaking_rate, noise_scale and noise_scale_duration from the config into model attributes
once, at load; VitsModel.forward reads the attributes, so changing `model.config.*` afterwards does nothing.
"""

import torch

from voicetune.voice import models
from voicetune.common import run_errors
from voicetune.common import speech

SETTINGS = ("speaking_rate", "noise_scale", "noise_scale_duration")


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



def say_all(model, tokenizer, sentences, speaker_id, seed):
    """Each sentence's audio, the noise seeded once for them all: the same text and seed, the same take."""
    torch.manual_seed(seed)
    return [say(model, tokenizer, sentence, speaker_id) for sentence in sentences]
