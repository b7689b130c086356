"""Speak Kurmanji text with a trained voice, or export the voice as ONNX for sherpa-onnx and onnxruntime, or as
a piper voice for piper, Home Assistant and sherpa-onnx.

Numbers written with digits are read as Kurmanji words (25 → bîst û pênc, 1987an → hezar û neh sed û heştê û
heftan); a text longer than one sentence is split only at sentence ends and each sentence spoken whole.

Examples:

    python speak.py "Ez 25 salî me." --out hello.wav               # the current voice of training/
    python speak.py --file examples/sentences.txt --out_dir spoken  # one WAV a line + lines.csv
    python speak.py "Ez 25 salî me." --dry_run                      # what the voice will read, nothing spoken
    python speak.py "Roj baş." --speaking_rate 0.8 --noise_scale 0.5 --seed 3 --out slow.wav
    python speak.py --model training/voice --export_onnx voice_onnx # model.onnx + tokens.txt for sherpa-onnx
    python speak.py --onnx voice_onnx "Ez 25 salî me." --out hello.wav   # onnxruntime only, no torch
    python speak.py --serve --data_dir training --wyoming_port 10200  # OpenAI API + Wyoming, follows --promote
    python speak.py --export_piper piper_voices --voice_name dilan  # ku_TR-dilan-low.onnx(.json) for piper
"""

import argparse
import os
import sys

import soundfile as sf

from voicetune.common import run_errors
from voicetune.common import speech
from voicetune.voice import onnx_voice
from voicetune.voice import piper_voice
from voicetune.voice import speak_lines
from voicetune.voice import voices

LINES_FILE = "lines.csv"


def parse_args(argv):
    parser = run_errors.FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--export_piper", metavar="DIR", default=None,
                        help="Write --model as a piper voice into DIR, a piper / wyoming-piper data folder: "
                             "ku_TR-<voice_name>-low.onnx + .onnx.json (Home Assistant), .tokens.txt (sherpa-onnx "
                             "runs the same .onnx) and .md (its model card and licences), checked against torch "
                             "with piper's own reading of the text first; the folder's other voices stay. Speaks "
                             "nothing.")
    parser.add_argument("--voice_name", default=None,
                        help="The piper voice's name, in its file name ku_TR-<name>-low. (default: the name of "
                             "the --data_dir folder, or of the --model folder when given)")
    parser.add_argument("--data_licence", default="Mozilla Common Voice, CC0-1.0",
                        help="The training data's source and licence, written in the piper voice's model card "
                             "beside the base voice's (MMS, CC-BY-NC-4.0). (default: %(default)s)")
    parser.add_argument("--serve", action="store_true",
                        help="Serve the current voice of --data_dir to apps: OpenAI's POST /v1/audio/speech, GET "
                             "/v1/models and /v1/audio/voices, numbers read as words; a --promote or --rollback "
                             "is followed without a restart. With --onnx DIR the voice is exported into DIR and "
                             "spoken on onnxruntime. See docs/serving.md.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="--serve's address; another than this machine's lets every machine that reaches it use "
                             "the voice (no password). (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000,
                        help="--serve's port (0: any free port). (default: %(default)s)")
    parser.add_argument("--wyoming_port", type=int, default=None,
                        help="Also serve the voice over Wyoming on this port, for Home Assistant (10200 is the "
                             "usual). (default: none)")
    parser.add_argument("--max_concurrent", type=int, default=2,
                        help="--serve: how many texts are spoken at once; more wait their turn. (default: "
                             "%(default)s)")
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
    export = "--export_onnx" if args.export_onnx else "--export_piper" if args.export_piper else None
    if export:
        if args.text or args.file or args.onnx:
            parser.error(f"{export} writes the --model voice and speaks nothing: give no text, --file or --onnx")
    elif args.serve:
        if args.text or args.file or args.model:
            parser.error("--serve speaks the current voice of --data_dir to apps: give no text, --file or --model")
        if args.max_concurrent < 1:
            parser.error("--max_concurrent must be at least 1")
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
    if args.voice_name is None:
        args.voice_name = os.path.basename(os.path.normpath(args.model if args.model_given else args.data_dir))
    if args.model is None and not args.onnx and not args.serve:
        args.model = str(voices.current_voice(args.data_dir))
    return args


def main(argv=None):
    # 1. Flags; an export speaks nothing; a server speaks what apps send it.
    args = parse_args(argv)
    try:
        if args.export_onnx:
            onnx_voice.export_folder(args.model, args.export_onnx, **speak_lines.settings(args))
            return 0
        if args.export_piper:
            piper_voice.export_folder(args.model, args.export_piper, args.voice_name, args.data_licence,
                                      **speak_lines.settings(args))
            return 0
        if args.serve:
            from voicetune.voice import voice_server  # the HTTP and Wyoming server: only --serve needs it

            voice_server.serve(args)
            return 0
        # 2. The voice, and what each line will be read as; a line it cannot read stops everything before any audio.
        voice, vocab = speak_lines.open_voice(args)
        lines = speak_lines.read_lines(args, vocab)
        if args.dry_run:
            for _, sentences in lines:
                print(" | ".join(sentences))
            return 0
        # 3. Speak each line into its WAV, its sentences whole with a pause between them, seeded afresh.
        written = []
        for number, (line, sentences) in enumerate(lines, 1):
            path = os.path.join(args.out_dir, f"line_{number:03d}.wav") if args.file else args.out
            folder, name = os.path.split(os.path.abspath(path))
            speak_lines.speak_files(voice, [(name, sentences)], folder, args.seed, args.sentence_pause)
            written.append((os.path.basename(path), line.replace("|", " ")))  # | separates lines.csv's fields
            print(f"{path} ({sf.info(path).duration:.1f} s): {' | '.join(sentences)}")
        # 4. Which file says which line.
        if args.file:
            speech.write_metadata(os.path.join(args.out_dir, LINES_FILE), written)
        return 0
    except (run_errors.TrainingError, OSError) as err:
        return run_errors.report_fatal(err, args.out_dir if args.file else args.out)


if __name__ == "__main__":
    sys.exit(main())
