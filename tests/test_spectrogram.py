"""spectrogram.py: the original VITS spectrograms."""

import librosa
import numpy as np
import torch

from voicetune.voice import spectrogram


def test_spectrograms_match_numpy_librosa_vits_formula():
    rng = np.random.default_rng(0)
    audio = (0.3 * np.sin(np.arange(7000) * 0.05) + 0.05 * rng.standard_normal(7000)).astype(np.float32)
    padded = np.pad(audio, (384, 384), mode="reflect")
    window = librosa.filters.get_window("hann", 1024, fftbins=True)
    n_frames = (len(padded) - 1024) // 256 + 1
    frames = np.stack([padded[i * 256:i * 256 + 1024] * window for i in range(n_frames)], axis=1)
    stft = np.fft.rfft(frames, axis=0)
    magnitude = np.sqrt(stft.real ** 2 + stft.imag ** 2 + 1e-6)
    basis = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=80, fmin=0, fmax=8000, htk=False, norm="slaney")
    expected_mel = np.log(np.clip(basis @ magnitude, 1e-5, None))

    spec = spectrogram.linear_spectrogram(torch.from_numpy(audio)[None])[0].numpy()
    mel = spectrogram.mel_spectrogram(torch.from_numpy(audio)[None], 16000)[0].numpy()
    assert spec.shape == (513, len(audio) // 256) == magnitude.shape
    np.testing.assert_allclose(spec, magnitude, atol=1e-4)
    np.testing.assert_allclose(mel, expected_mel, atol=1e-4)
