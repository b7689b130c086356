"""Speak Kurmanji text with a trained voice, or export the voice as ONNX for sherpa-onnx and onnxruntime.

Numbers written with digits are read as Kurmanji words (25 → bîst û pênc, 1987an → hezar û neh sed û heştê û
heftan); a text longer than one sentence is split only at sentence ends and each sentence spoken whole.

Examples:

    python speak.py "Ez 25 salî me." --out hello.wav               # the current voice of training/
    python speak.py --file sentences.txt --out_dir spoken           # one WAV a line + lines.csv
    python speak.py "Ez 25 salî me." --dry_run                      # what the voice will read, nothing spoken
    python speak.py "Roj baş." --speaking_rate 0.8 --noise_scale 0.5 --seed 3 --out slow.wav
    python speak.py --model training/voice --export_onnx voice_onnx # model.onnx + tokens.txt for sherpa-onnx
    python speak.py --onnx voice_onnx "Ez 25 salî me." --out hello.wav   # onnxruntime only, no torch
"""

import argparse
import os
import sys
import unicodedata

from voicetune.common import kurmanji_text
from voicetune.common import run_errors
from voicetune.common import speech

LINES_FILE = "lines.csv"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", help="The text to speak (or --file).")
    parser.add_argument("--file", help="A UTF-8 text file: each non-empty line spoken into a WAV of its own.")
    parser.add_argument("--out", default="speech.wav", help="The WAV for TEXT. (default: %(default)s)")
    parser.add_argument("--out_dir", default="speech",
                        help=f"Where --file's WAVs (line_001.wav, ...) and {LINES_FILE} (file|line) go. "
                             "(default: %(default)s)")
    parser.add_argument("--data_dir", default="training",
                        help="The training folder whose current voice speaks when --model is not given: "
                             "<data_dir>/voice where a tune was promoted, else <data_dir>/final_model. "
                             "(default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="A voice folder (transformers format) or a Hub name. (default: the current voice "
                             "of --data_dir)")
    parser.add_argument("--onnx", metavar="DIR", default=None,
                        help="Speak with an exported ONNX voice (DIR/model.onnx + tokens.txt) on onnxruntime "
                             "alone, without importing torch. (default: the --model voice on torch)")
    parser.add_argument("--export_onnx", metavar="OUT", default=None,
                        help="Write --model as OUT/model.onnx + tokens.txt + README.md for sherpa-onnx's offline "
                             "TTS and onnxruntime, checked against torch first; speaks nothing. The speaking "
                             "settings given become the exported voice's defaults.")
    parser.add_argument("--speaking_rate", type=float, default=None,
                        help="Faster above 1, slower below: every sound lasts 1/rate as long. (default: the "
                             "voice's own, 1.0 for MMS)")
    parser.add_argument("--noise_scale", type=float, default=None,
                        help="Variation of the voice's sound (0: the same every time). (default: the voice's "
                             "own, 0.667 for MMS)")
    parser.add_argument("--noise_scale_duration", type=float, default=None,
                        help="Variation of the sounds' lengths, the rhythm (0: the same every time). (default: "
                             "the voice's own, 0.8 for MMS)")
    parser.add_argument("--speaker_id", type=int, default=None,
                        help="Which speaker of a multi-speaker voice (speakers.json beside it names them). "
                             "(default: none, for a single voice)")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the voice's noise: another seed, another take of the same text (each line "
                             "is seeded afresh; onnxruntime's noise cannot be seeded). (default: %(default)s)")
    parser.add_argument("--sentence_pause", type=float, default=0.3,
                        help="Seconds of silence between the sentences of a longer text (none around a single "
                             "sentence). (default: %(default)s)")
    parser.add_argument("--reading", action="append", default=[], metavar="SYMBOL=WORDS",
                        help="Read a symbol that has no agreed Kurmanji reading (currency, units, minus: see "
                             "docs/text.md) as WORDS, e.g. --reading '$=dolar' --reading '-=kêm'; also changes "
                             "a number's word, e.g. --reading 12=dwazdeh. Repeatable. (default: such a symbol "
                             "stops with the reason)")
    parser.add_argument("--dry_run", action="store_true",
                        help="Print each line exactly as the voice will read it (sentences split by ' | ') and "
                             "speak nothing.")
    args = parser.parse_args(argv)
    if args.export_onnx:
        if args.text or args.file or args.onnx:
            parser.error("--export_onnx writes the --model voice and speaks nothing: give no text, --file or --onnx")
    elif bool(args.text) == bool(args.file):
        parser.error("give the text to speak, or --file (one of them)")
    if args.speaking_rate is not None and args.speaking_rate <= 0:
        parser.error("--speaking_rate must be above 0")
    for name in ("noise_scale", "noise_scale_duration", "sentence_pause"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} cannot be negative")
    readings = {}
    for item in args.reading:
        symbol, sep, words = item.partition("=")
        if not sep or not symbol or not words.strip():
            parser.error(f"--reading {item!r}: write SYMBOL=WORDS")
        readings[symbol] = words.strip()
    args.readings = readings
    args.model_given = args.model is not None
    if args.model is None and not args.onnx:
        from voicetune.voice import voices  # brings torch, which an --onnx voice speaks without

        args.model = str(voices.current_voice(args.data_dir))
    return args


def load_vocab(args):
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
        where = f"{args.file} line {number}: " if args.file else ""
        try:
            words = kurmanji_text.normalize(unicodedata.normalize("NFC", line), args.readings)
        except kurmanji_text.Unreadable as err:
            raise run_errors.TrainingError(f"{where}{line!r}: cannot be read: {err}") from None
        sentences = []
        for sentence in kurmanji_text.split_sentences(words):
            text, reason = speech.clean_text(sentence, vocab)
            if reason:
                raise run_errors.TrainingError(f"{where}{sentence!r}: cannot be read: "
                                               f"{unspeakable(sentence, reason, vocab)}")
            sentences.append(text)
        if not sentences:
            raise run_errors.TrainingError(f"{where}{line!r}: cannot be read: there is nothing to say in it")
        read.append((line, sentences))
    return read


class TorchVoice:
    """The transformers voice with the speaking settings set where it reads them."""

    def __init__(self, args):
        from voicetune.voice import speaking

        self.speaking = speaking
        self.model, self.tokenizer = speaking.load(args.model, speaking_rate=args.speaking_rate,
                                                   noise_scale=args.noise_scale,
                                                   noise_scale_duration=args.noise_scale_duration)
        self.speaker_id = speaking.check_speaker(self.model.config, args.speaker_id)
        self.sampling_rate = self.model.config.sampling_rate
        self.seed = args.seed

    def say(self, sentences):
        return self.speaking.say_all(self.model, self.tokenizer, sentences, self.speaker_id, self.seed)


class OnnxRuntimeVoice:
    """The exported voice on onnxruntime; the same flags as scales of the graph."""

    def __init__(self, args):
        from voicetune.voice import onnx_voice

        path = os.path.join(args.onnx, onnx_voice.MODEL_FILE)
        if not os.path.isfile(path) or not os.path.isfile(os.path.join(args.onnx, onnx_voice.TOKENS_FILE)):
            raise run_errors.TrainingError(f"--onnx {args.onnx}: no {onnx_voice.MODEL_FILE} + "
                                           f"{onnx_voice.TOKENS_FILE} there (write them with --export_onnx)")
        self.voice = onnx_voice.OnnxVoice(path)
        self.vocab, self.sampling_rate = self.voice.vocab, self.voice.sampling_rate
        speakers = self.voice.speakers
        if args.speaker_id is not None and not 0 <= args.speaker_id < speakers:
            raise run_errors.TrainingError(f"--speaker_id {args.speaker_id}: this voice has speakers 0-{speakers - 1}")
        self.scales = dict(noise_scale=args.noise_scale, noise_scale_w=args.noise_scale_duration,
                           length_scale=None if args.speaking_rate is None else 1.0 / args.speaking_rate,
                           speaker_id=args.speaker_id)

    def say(self, sentences):
        return [self.voice.say(s, **self.scales) for s in sentences]


def export(args):
    from voicetune.voice import onnx_voice
    from voicetune.voice import speaking

    model, tokenizer = speaking.load(args.model, speaking_rate=args.speaking_rate, noise_scale=args.noise_scale,
                                     noise_scale_duration=args.noise_scale_duration)
    try:
        out = onnx_voice.export(model, tokenizer, args.export_onnx)
    except onnx_voice.ExportError as err:
        raise run_errors.TrainingError(f"--export_onnx {args.export_onnx}: {err}") from None
    print(f"wrote {os.path.join(out, onnx_voice.MODEL_FILE)} + {onnx_voice.TOKENS_FILE} + README.md (the graph "
          "says what the torch voice says on every letter of its vocabulary)")


def main(argv=None):
    # 1. Flags; an export speaks nothing.
    args = parse_args(argv)
    try:
        if args.export_onnx:
            export(args)
            return 0
        # 2. What each line will be read as; a line the voice cannot read stops everything before any audio.
        if args.onnx:
            voice = OnnxRuntimeVoice(args)
            vocab = voice.vocab
        else:
            vocab = load_vocab(args)
            voice = None if args.dry_run else TorchVoice(args)
        lines = read_lines(args, vocab)
        if args.dry_run:
            for _, sentences in lines:
                print(" | ".join(sentences))
            return 0
        # 3. Speak each line, its sentences whole with a pause between them, and write its WAV.
        written = []
        for number, (line, sentences) in enumerate(lines, 1):
            audio = speech.join_sentences(voice.say(sentences), voice.sampling_rate, args.sentence_pause)
            path = os.path.join(args.out_dir, f"line_{number:03d}.wav") if args.file else args.out
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            speech.write_wav(path, audio, voice.sampling_rate)
            written.append((os.path.basename(path), line.replace("|", " ")))  # | separates lines.csv's fields
            print(f"{path} ({len(audio) / voice.sampling_rate:.1f} s): {' | '.join(sentences)}")
        # 4. Which file says which line.
        if args.file:
            speech.write_metadata(os.path.join(args.out_dir, LINES_FILE), written)
        return 0
    except (run_errors.TrainingError, OSError) as err:
        return run_errors.report_fatal(err, args.out_dir if args.file else args.out)


if __name__ == "__main__":
    sys.exit(main())
