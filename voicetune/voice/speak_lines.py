"""The one way every command speaks texts into named WAVs (speak.py, the listening kit and page, a feedback
run's samples, the blind comparison, the epochs' listening samples), with the torch voice
(speaking.TorchVoice) or the exported one on onnxruntime (onnx_voice.OnnxVoice); and what speak.py reads: its
lines as the voice will say them, and which voice says them.

No torch: speak.py --onnx speaks through here on onnxruntime alone; torch is imported only to load a torch voice.
"""

import os
import unicodedata

from voicetune.common import kurmanji_text
from voicetune.common import run_errors
from voicetune.common import speech
from voicetune.voice import onnx_voice


def speak_files(voice, named_texts, out_dir, seed=0, pause=0.0):
    """Speak each (file name, text) into OUT_DIR/<file name>, a 16-bit WAV replaced atomically, and return the
    paths. The noise is seeded once with `seed` and the texts spoken in order: the same list, the same takes.
    A text is one cleaned sentence, or a list of them spoken whole with `pause` seconds between them.
    `voice`: a speaking.TorchVoice or an onnx_voice.OnnxVoice, loaded once by the caller."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    with voice.seeded(seed):
        for name, text in named_texts:
            clips = [voice.say(sentence) for sentence in ([text] if isinstance(text, str) else text)]
            paths.append(os.path.join(out_dir, name))
            speech.write_wav(paths[-1], speech.join_sentences(clips, voice.sampling_rate, pause), voice.sampling_rate)
    return paths


# ----------------------------------------------------------------------------------------------------
# speak.py: its voice, and its lines as the voice reads them.

def settings(args):
    """speak.py's speaking flags, as speaking.load and onnx_voice.OnnxVoice take them (None: the voice's own)."""
    return dict(speaking_rate=args.speaking_rate, noise_scale=args.noise_scale,
                noise_scale_duration=args.noise_scale_duration)


def open_voice(args):
    """(voice, the letters it can say): --onnx on onnxruntime alone, else the --model voice on torch (its
    tokenizer alone for a --dry_run, which speaks nothing)."""
    if args.onnx:
        voice = onnx_voice.open_voice(args.onnx, args.speaker_id, **settings(args))
        return voice, voice.vocab
    vocab = voice_vocab(args)
    if args.dry_run:
        return None, vocab
    from voicetune.voice import speaking  # torch: only the torch voice brings it

    return speaking.TorchVoice.load(args.model, args.speaker_id, **settings(args)), vocab


def voice_vocab(args):
    """The letters the --model voice can say; one line naming the voice when it cannot be loaded."""
    if not args.model_given and not os.path.isdir(args.model):
        raise run_errors.TrainingError(f"no voice in --data_dir {args.data_dir} (neither voice/ nor final_model/ "
                                       "there): train one with train_vits.py, or give --model")
    try:
        return speech.load_vocab(args.model)[1]
    except (OSError, ValueError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise run_errors.TrainingError(f"--model {args.model}: cannot load the voice's tokenizer "
                                       f"({first_line})") from None


def unspeakable(sentence, reason, vocab):
    """Why the voice cannot say `sentence`, in words."""
    if reason == "other_script":
        return "it is written in another script; the voice reads the Kurmanji Latin alphabet"
    if reason == "unsupported_letter":
        text = sentence.lower()
        letter = next((ch for ch in text if ch.isalpha() and ch not in vocab and ch not in speech.LETTER_FIXES), "?")
        return f"the letter {letter!r} ({unicodedata.name(letter, 'unknown')}) is not in the voice's alphabet"
    if reason == "digits":
        return "it holds a digit with no Kurmanji reading"
    return "there is nothing to say in it"


def read_lines(args, vocab):
    """[(line, [cleaned sentences])]; TrainingError naming the first line the voice cannot read, and why."""
    if args.file:
        try:
            with open(args.file, encoding="utf-8-sig") as f:
                lines = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise run_errors.TrainingError(f"--file {args.file}: cannot be read as UTF-8 text ({err})") from None
        if not lines:
            raise run_errors.TrainingError(f"--file {args.file}: no line to speak")
    else:
        lines = [args.text]
    read = []
    for number, line in enumerate(lines, 1):
        try:
            read.append((line, sentences_of(line, vocab, args.readings)))
        except Unsayable as err:
            where = f"{args.file} line {number}: " if args.file else ""
            raise run_errors.TrainingError(f"{where}{err.part!r}: cannot be read: {err.why}") from None
    return read


class Unsayable(ValueError):
    """A text the voice cannot say: `part` (the text, or the sentence of it) and `why`, in words."""

    def __init__(self, part, why):
        super().__init__(f"{part!r}: {why}")
        self.part, self.why = part, why


def sentences_of(text, vocab, readings=None):
    """The sentences the voice says for `text`, cleaned, numbers read as words (--reading's `readings` too);
    Unsayable naming what it cannot say and why."""
    try:
        words = kurmanji_text.normalize(unicodedata.normalize("NFC", text), readings)
    except kurmanji_text.Unreadable as err:
        raise Unsayable(text, str(err)) from None
    sentences = []
    for sentence in kurmanji_text.split_sentences(words):
        cleaned, reason = speech.clean_text(sentence, vocab)
        if reason:
            raise Unsayable(sentence, unspeakable(sentence, reason, vocab))
        sentences.append(cleaned)
    if not sentences:
        raise Unsayable(text, "there is nothing to say in it")
    return sentences
