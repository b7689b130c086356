"""Spectrograms exactly as the original VITS computes them (mel_processing.py), always in fp32 (cuFFT has
no bf16): a magnitude STFT with torch.stft and a log-mel with librosa's Slaney filters."""

import librosa
import torch
import torch.nn.functional as F

from voicetune.common import speech

# The settings MMS was trained on; the hop is the one prepare_data.py checked each clip's frames against.
N_FFT, WIN, N_MELS, FMIN, FMAX = 1024, 1024, 80, 0.0, 8000.0
HOP = speech.HOP_LENGTH
SPEC_SETTINGS = dict(n_fft=N_FFT, hop=HOP, win=WIN, n_mels=N_MELS, fmin=FMIN, fmax=FMAX, pad="reflect384")
_MEL_BASIS = {}
_WINDOWS = {}


def linear_spectrogram(audio):
    """Magnitude STFT of a [B, T] float waveform -> [B, 513, T // 256]."""
    audio = audio.float()
    key = str(audio.device)
    if key not in _WINDOWS:
        _WINDOWS[key] = torch.hann_window(WIN, device=audio.device)
    pad = (N_FFT - HOP) // 2
    audio = F.pad(audio.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    with torch.autocast(audio.device.type, enabled=False):
        stft = torch.stft(audio, N_FFT, hop_length=HOP, win_length=WIN, window=_WINDOWS[key],
                          center=False, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    return torch.sqrt(stft.real.pow(2) + stft.imag.pow(2) + 1e-6)


def spec_to_mel(spec, sampling_rate):
    key = (str(spec.device), sampling_rate)
    if key not in _MEL_BASIS:
        basis = librosa.filters.mel(sr=sampling_rate, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
        _MEL_BASIS[key] = torch.from_numpy(basis).float().to(spec.device)
    with torch.autocast(spec.device.type, enabled=False):  # an autocast matmul would return fp16
        return torch.log(torch.clamp(torch.matmul(_MEL_BASIS[key], spec.float()), min=1e-5))


def mel_spectrogram(audio, sampling_rate):
    """Log-mel of a [B, T] waveform -> [B, 80, T // 256]."""
    return spec_to_mel(linear_spectrogram(audio), sampling_rate)


def silence_mel(sampling_rate, device):
    """[80]: the log-mel of digital silence (about -9.66 in every band at 16 kHz), what the mel of a clip
    padded with zeros would be."""
    return mel_spectrogram(torch.zeros(1, N_FFT, device=device), sampling_rate)[0, :, 0]
