"""The voice as one ONNX file that sherpa-onnx's offline TTS (VITS, character frontend, no lexicon) and plain
onnxruntime run: the export, checked against torch before it is written; tokens.txt; and speaking with
onnxruntime alone.

The graph's inputs are those sherpa-onnx feeds a VITS model (sherpa-onnx/csrc/offline-tts-vits-model.cc):
x [1, n] int64 token ids, x_length [1], noise_scale [1], length_scale [1], noise_scale_w [1] (the duration
noise), and sid [1] for a multi-speaker voice; out: y [1, 1, samples]. Its metadata is what that file reads:
model_type, comment, language, sample_rate, add_blank, n_speakers, frontend=characters, blank_id and
use_eos_bos=0 (MMS puts a blank around every letter and nothing else).

torch, transformers and onnx are imported only by the export: a server that speaks with `OnnxVoice` needs
onnxruntime and numpy (plus speech.py's own soundfile and librosa), not torch.
"""

import contextlib
import os
import shutil
import warnings

import numpy as np

from voicetune.common import run_errors
from voicetune.common import run_folder
from voicetune.common import speech

MODEL_FILE = "model.onnx"
TOKENS_FILE = "tokens.txt"
INPUTS = ["x", "x_length", "noise_scale", "length_scale", "noise_scale_w"]
# A torch voice and its ONNX graph at zero noise: the same number of samples, and samples this close.
MAX_DIFFERENCE = 1e-3  # of the clip's peak
OPSET = 17
TRACE_EXAMPLE = [0, 5, 0, 6, 0, 7, 0]  # the ids the graph is traced on (any ids of the vocabulary will do)


class ExportError(RuntimeError):
    """The graph does not say what the torch voice says; nothing was written."""


def token_lines(tokenizer):
    """tokens.txt rows (character, id): the voice's own letters first, then the characters users type for
    them, so sherpa-onnx gives the ids our text cleaning gives: capitals (sherpa-onnx lowercases only
    ASCII), typographic apostrophes, and the other keyboards' letters of speech.LETTER_FIXES. Tokens of more
    than one character (<unk>) cannot be typed and sherpa-onnx refuses them: left out."""
    ids = {token: i for token, i in tokenizer.get_vocab().items() if len(token) == 1}
    lines = sorted(ids.items(), key=lambda item: item[1])
    aliases = [(ch.upper(), i) for ch, i in lines if len(ch.upper()) == 1 and ch.upper() != ch]
    if "'" in ids:
        aliases += [(a, ids["'"]) for a in speech.APOSTROPHES]
    aliases += [(wrong, ids[right]) for wrong, right in speech.LETTER_FIXES.items() if right in ids]
    aliases += [(wrong.upper(), ids[right]) for wrong, right in speech.LETTER_FIXES.items()
                if right in ids and len(wrong.upper()) == 1]
    taken = set(ids)
    for ch, i in aliases:
        if ch not in taken:
            taken.add(ch)
            lines.append((ch, i))
    return lines


def write_tokens(path, lines):
    # "<char> <id>" a line; the space is written " <id>", which sherpa-onnx reads back as the space.
    run_folder.write_atomically(path, "".join(f"{ch} {i}\n" for ch, i in lines).encode("utf-8"), durable=False)


def read_tokens(path):
    """{character: id} of a tokens.txt, and the voice's own letters (the first character given each id)."""
    table, letters = {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line:
                continue
            ch, i = (" ", line.strip()) if line.startswith(" ") else line.split(" ")
            table[ch] = int(i)
            letters.setdefault(int(i), ch)
    return table, set(letters.values())


def with_blanks(ids, blank):
    """MMS's 2n+1 ids: a blank before, between and after the letters."""
    out = [blank]
    for i in ids:
        out += [i, blank]
    return out


def check_sentences(tokenizer):
    """Id sequences covering every letter of the vocabulary, from one letter to far beyond the text encoder's
    relative-attention window (a graph traced on one length must hold on every other)."""
    blank = tokenizer.pad_token_id
    letters = sorted(i for token, i in tokenizer.get_vocab().items() if len(token) == 1 and i != blank)
    every = letters + [blank]  # the pad id is a letter too in MMS vocabularies
    return [with_blanks(ids, blank) for ids in (every[:1], every[:3], every, every * 4)]


def export(model, tokenizer, out_dir, check=None):
    """Write out_dir/model.onnx + tokens.txt + README.md, after checking the graph against `model` at zero
    noise on `check` (default: check_sentences) for every speaker; ExportError, writing nothing, if it
    differs. Written into a temp folder and swapped in whole, so a failed export keeps an earlier one."""
    import onnx

    from voicetune.voice import models

    model = model.float().cpu().eval()
    speakers = max(model.config.num_speakers, 1)
    check = check or check_sentences(tokenizer)
    out_dir = os.path.abspath(out_dir)
    tmp = run_folder.temp_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        path = os.path.join(tmp, MODEL_FILE)
        trace(model, path, speakers > 1)
        graph = onnx.load(path)
        meta = metadata(model, tokenizer, speakers)
        for key, value in meta.items():
            graph.metadata_props.add(key=key, value=str(value))
        onnx.save(graph, path)
        for sid in sorted({0, speakers - 1}):
            verify(model, path, check, sid if speakers > 1 else None)
        write_tokens(os.path.join(tmp, TOKENS_FILE), token_lines(tokenizer))
        run_folder.write_atomically(os.path.join(tmp, "README.md"), readme(meta).encode("utf-8"), durable=False)
        models.replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_folder(model_dir, out_dir, **settings):
    """speak.py --export_onnx: the voice in `model_dir` with its speaking settings (speaking.SETTINGS; they
    become the exported voice's defaults) exported to `out_dir`; one line saying why when it differs."""
    from voicetune.voice import speaking

    model, tokenizer = speaking.load(model_dir, **settings)
    try:
        out = export(model, tokenizer, out_dir)
    except ExportError as err:
        raise run_errors.TrainingError(f"--export_onnx {out_dir}: {err}") from None
    print(f"wrote {os.path.join(out, MODEL_FILE)} + {TOKENS_FILE} + README.md (the graph says what the torch voice "
          "says on every letter of its vocabulary)")


def relative_embeddings(attention, embeddings, length):
    """The window of transformers' VitsAttention._get_relative_embeddings without its Python branch on the
    length, which tracing would freeze at the example's length: always pad by length - 1, then slice."""
    import torch

    padded = torch.nn.functional.pad(embeddings, [0, 0, length - 1, length - 1, 0, 0])
    return padded[:, attention.window_size:attention.window_size + 2 * length - 1]


def trace(model, path, multi_speaker):
    import torch
    from transformers.models.vits import modeling_vits

    class Graph(torch.nn.Module):
        """VitsModel.forward with the noise and length scales as inputs instead of attributes."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, x_length, noise_scale, length_scale, noise_scale_w, sid=None):
            # One sentence at a time, as sherpa-onnx sends them: x_length cuts x (an attention mask would take
            # transformers' mask shortcuts, which tracing freezes).
            x = x[:, :x_length[0]]
            self.model.noise_scale, self.model.noise_scale_duration = noise_scale, noise_scale_w
            out = self.model(input_ids=x, speaker_id=sid, speaking_rate=1.0 / length_scale)
            return out.waveform[:, None]

    saved = {name: getattr(model, name) for name in ("noise_scale", "noise_scale_duration")}
    original = modeling_vits.VitsAttention._get_relative_embeddings
    modeling_vits.VitsAttention._get_relative_embeddings = relative_embeddings  # this module's, looked up now
    example = torch.tensor([TRACE_EXAMPLE])
    args = (example, torch.tensor([example.shape[1]]), torch.tensor([0.667]), torch.tensor([1.0]),
            torch.tensor([0.8]))
    names = INPUTS + (["sid"] if multi_speaker else [])
    if multi_speaker:
        args += (torch.tensor([0]),)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # What the tracer says of transformers' Python branches (checked by verify, which runs the graph
            # against the voice) and of constant folding: lines of warnings that would bury the export's own line.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            torch.onnx.export(Graph().eval(), args, path, input_names=names, output_names=["y"], opset_version=OPSET,
                              dynamic_axes={"x": {1: "tokens"}, "y": {2: "samples"}}, dynamo=False)
    finally:
        modeling_vits.VitsAttention._get_relative_embeddings = original
        model.eval()  # the exporter puts modules back in the mode it found, train for a fresh wrapper
        for name, value in saved.items():
            setattr(model, name, value)


def verify(model, path, check, speaker_id):
    """ExportError unless the graph and the torch voice say the same at zero noise for each id sequence."""
    import torch

    voice = OnnxVoice(path)
    saved = {name: getattr(model, name) for name in ("noise_scale", "noise_scale_duration", "speaking_rate")}
    model.noise_scale = model.noise_scale_duration = 0.0
    model.speaking_rate = 1.0
    try:
        for ids in check:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), speaker_id=speaker_id)
            expected = out.waveform[0, :int(out.sequence_lengths[0])].numpy()
            try:
                got = voice.run(ids, noise_scale=0.0, length_scale=1.0, noise_scale_w=0.0, speaker_id=speaker_id)
            except Exception as err:  # onnxruntime reports a graph that breaks on this length as it sees fit
                raise ExportError(f"the ONNX graph fails on {len(ids)} ids ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]}): not written") from None
            if len(got) != len(expected):
                raise ExportError(f"the ONNX graph says {len(ids)} ids in {len(got)} samples, the torch voice in "
                                  f"{len(expected)}: not written")
            peak = max(float(np.abs(expected).max()), 1e-6)
            worst = float(np.abs(got - expected).max())
            if worst > MAX_DIFFERENCE * peak:
                raise ExportError(f"the ONNX graph differs from the torch voice by {worst / peak:.2g} of the peak "
                                  f"on {len(ids)} ids (speaker {speaker_id}): not written")
    finally:
        for name, value in saved.items():
            setattr(model, name, value)


def metadata(model, tokenizer, speakers):
    """What sherpa-onnx reads, and the voice's own scales (the model's settings, as speaking.load set them)."""
    return dict(model_type="vits", comment="mms", language="Kurmanji", voice="kmr",
                sample_rate=model.config.sampling_rate, add_blank=1, n_speakers=speakers,
                frontend="characters", blank_id=tokenizer.pad_token_id, pad_id=tokenizer.pad_token_id,
                use_eos_bos=0, punctuation="", noise_scale=model.noise_scale,
                noise_scale_w=model.noise_scale_duration, length_scale=1.0 / model.speaking_rate)


def readme(meta):
    speakers = meta["n_speakers"]
    return f"""# A Kurmanji VITS voice as ONNX

- `model.onnx`: the voice ({meta['sample_rate']} Hz, {speakers} speaker{'s' * (speakers > 1)}); inputs
  x, x_length, noise_scale, length_scale, noise_scale_w{', sid' if speakers > 1 else ''}; output y [1, 1, samples].
- `tokens.txt`: one character and its id a line; capitals and typographic apostrophes map to the voice's own letters.

The voice's own settings: noise_scale {meta['noise_scale']}, noise_scale_w {meta['noise_scale_w']}, length_scale
{meta['length_scale']:.4g}.

Speak with sherpa-onnx (pip install sherpa-onnx; Android, iOS, Raspberry Pi, WebAssembly alike):

```python
import sherpa_onnx
tts = sherpa_onnx.OfflineTts(sherpa_onnx.OfflineTtsConfig(
    model=sherpa_onnx.OfflineTtsModelConfig(vits=sherpa_onnx.OfflineTtsVitsModelConfig(
        model="model.onnx", tokens="tokens.txt", noise_scale={meta['noise_scale']},
        noise_scale_w={meta['noise_scale_w']}, length_scale={meta['length_scale']:.4g}))))
audio = tts.generate("ez bîst û pênc salî me", sid=0)
```

sherpa-onnx reads the letters as they are: write numbers as words first (kurmanji_text.normalize does it, with no
dependencies), or speak with `python speak.py --onnx THIS_FOLDER "Ez 25 salî me."`.
"""


def open_voice(folder, speaker_id=None, **settings):
    """The exported voice in `folder` (--onnx) with speak.py's speaking settings; one line saying what is
    wrong when it is not there or has no such speaker."""
    path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, TOKENS_FILE)):
        raise run_errors.TrainingError(f"--onnx {folder}: no {MODEL_FILE} + {TOKENS_FILE} there (write them with "
                                       "--export_onnx)")
    voice = OnnxVoice(path, speaker_id=speaker_id, **settings)
    if speaker_id is not None and not 0 <= speaker_id < voice.speakers:
        raise run_errors.TrainingError(f"--speaker_id {speaker_id}: this voice has speakers 0-{voice.speakers - 1}")
    return voice


class OnnxVoice:
    """The exported voice run by onnxruntime (no torch); what speak_lines.speak_files speaks with, as a TorchVoice.
    The settings (None: the voice's own) are speak.py's, as scales of the graph."""

    def __init__(self, path, threads=None, speaker_id=None, speaking_rate=None, noise_scale=None,
                 noise_scale_duration=None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.sampling_rate = int(meta["sample_rate"])
        self.blank = int(meta["blank_id"])
        self.speakers = int(meta["n_speakers"])
        self.defaults = dict(noise_scale=float(meta["noise_scale"]), noise_scale_w=float(meta["noise_scale_w"]),
                             length_scale=float(meta["length_scale"]))
        tokens = os.path.join(os.path.dirname(os.path.abspath(path)), TOKENS_FILE)
        self.tokens, letters = read_tokens(tokens) if os.path.isfile(tokens) else ({}, set())
        # The letters our text cleaning may keep, as speech.load_vocab gives them for the torch voice.
        self.vocab = {ch for ch in letters if ch != "|" and not (self.tokens[ch] == self.blank and not ch.isalpha())}
        self.scales = dict(noise_scale=noise_scale, noise_scale_w=noise_scale_duration, speaker_id=speaker_id,
                           length_scale=None if speaking_rate is None else 1.0 / speaking_rate)

    def run(self, ids, noise_scale=None, length_scale=None, noise_scale_w=None, speaker_id=None):
        """Audio for one sequence of ids (blanks included); unset scales are the voice's own."""
        scale = lambda value, name: np.array([self.defaults[name] if value is None else value], dtype=np.float32)
        feed = dict(x=np.array([ids], dtype=np.int64), x_length=np.array([len(ids)], dtype=np.int64),
                    noise_scale=scale(noise_scale, "noise_scale"), length_scale=scale(length_scale, "length_scale"),
                    noise_scale_w=scale(noise_scale_w, "noise_scale_w"))
        if self.speakers > 1:
            feed["sid"] = np.array([speaker_id or 0], dtype=np.int64)
        return self.session.run(["y"], feed)[0].reshape(-1)

    def say(self, sentence, **scales):
        """One cleaned sentence (every character in self.vocab) as float32 audio; `scales` override the voice's."""
        return self.run(with_blanks([self.tokens[ch] for ch in sentence], self.blank), **{**self.scales, **scales})

    def seeded(self, seed):
        """onnxruntime's noise cannot be seeded: each take differs (unless the noise scales are 0)."""
        return contextlib.nullcontext()
