"""Turn a Common Voice Kurmanji release into a clean VITS training set (16 kHz mono WAVs + metadata.csv).

Reads a Common Voice language folder (`clips/` + `validated.tsv`), the release tarball itself (streamed,
never unpacked to disk), a Hugging Face dataset (a Hub id, parquet shards or a save_to_disk folder, read
with pyarrow in batches) or an LJSpeech-style folder (`wavs/` + `metadata.csv`). Every clip is decoded
with soundfile, mixed to mono, resampled to 16 kHz with librosa and trimmed of leading/trailing silence;
its text is normalised so the tokenizer accepts every character. Clips that are unreadable, silent, too
short or long, hold text the voice cannot say, or whose text cannot match their audio are skipped and
counted by reason. Re-running only decodes what is new.

    # the full release, straight from the tarball, with the real tokenizer
    python prepare_data.py --input cv-corpus-22.0-2025-06-20-kmr.tar.gz --output_dir training

    # an unpacked language folder, one consistent voice, offline tokenizer from a local model folder
    python prepare_data.py --input cv-corpus-22.0-2025-06-20/kmr --top_speakers 1 --model my_model/

    # a Common Voice mirror on the Hugging Face Hub, only clips with 2+ up-votes and no down-vote
    python prepare_data.py --input amedcj/kurmanji-commonvoice --min_upvotes 2 --max_downvotes 0

    # tiny CPU run on the committed sample (see README)
    python prepare_data.py --input examples/cv-kmr-sample --model example_run/tiny_model \\
        --output_dir example_run

Output: DIR/wavs/<clip>.wav, DIR/metadata.csv (`<clip>.wav|text`, no header, no quoting),
DIR/speakers.csv (`<clip>.wav|client_id`, for train_vits.py --speakers; none for an input without speakers),
DIR/prepare_report.json (kept clips and hours, dropped clips by reason, hours per speaker) and
DIR/prepare_cache.json (what each clip's audio measured, so a re-run decodes nothing it already knows).
"""

import argparse
import os
import signal

from voicetune.common import run_errors
from voicetune.common import run_folder
from voicetune.common import speech
from voicetune.data import selection
from voicetune.data import sources
from voicetune.data import training_set

DEFAULT_MODEL = "facebook/mms-tts-kmr-script_latin"
INTERRUPTED = "the clips decoded so far are remembered: the same command goes on from there"


def parse_args(argv):
    parser = run_errors.FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="Common Voice language folder (clips/ + validated.tsv), its release tarball "
                             "(.tar/.tar.gz), an LJSpeech folder (wavs/ + metadata.csv), or a Hugging Face "
                             "dataset: a Hub id (owner/name), a folder of parquet files, or a save_to_disk folder.")
    parser.add_argument("--output_dir", default="training", help="Where wavs/, metadata.csv and the report go. (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub name or local folder of the voice; its tokenizer decides which characters "
                             "it can speak. (default: %(default)s)")
    parser.add_argument("--tsv", default="validated.tsv", help="Common Voice clip list to read. (default: %(default)s)")
    parser.add_argument("--split", default="train", help="Split of a Hugging Face dataset. (default: %(default)s)")
    parser.add_argument("--audio_column", default=None,
                        help="Hugging Face dataset column holding the audio. (default: audio, else path)")
    parser.add_argument("--text_column", default=None,
                        help="Column holding the text, of a Hugging Face dataset or a Common Voice TSV; used even "
                             f"where another text column exists. (default: the first of {', '.join(sources.TEXT_COLUMNS)})")
    parser.add_argument("--min_duration", type=float, default=1.0, help="Shortest clip kept, seconds after trimming. (default: %(default)s)")
    parser.add_argument("--max_duration", type=float, default=15.0, help="Longest clip kept, seconds after trimming. (default: %(default)s)")
    parser.add_argument("--min_chars_per_second", type=float, default=4.0,
                        help="Slower speech than this means text and audio do not match. (default: %(default)s)")
    parser.add_argument("--max_chars_per_second", type=float, default=25.0,
                        help="Faster speech than this means text and audio do not match. (default: %(default)s)")
    parser.add_argument("--max_clips", type=int, default=None,
                        help="Prepare at most this many clips: the first ones, in list order, whose text "
                             "passes. (default: all)")
    parser.add_argument("--speaker", action="append", default=[], metavar="CLIENT_ID",
                        help="Only this Common Voice client_id; repeat for several. This chooses whose clips are "
                             "prepared; every kept clip's speaker goes to speakers.csv, and train_vits.py --speakers "
                             "then chooses between one pooled voice and one voice per speaker. (default: every speaker)")
    parser.add_argument("--top_speakers", type=int, default=None, metavar="N",
                        help="Only the N speakers with the most clips in the list (whose clips are prepared; see "
                             "--speaker). (default: every speaker)")
    parser.add_argument("--min_upvotes", type=int, default=None, metavar="N",
                        help="Only clips with at least N up-votes (Common Voice up_votes). (default: no limit: "
                             "every clip of the list, e.g. all Common Voice validated)")
    parser.add_argument("--max_downvotes", type=int, default=None, metavar="N",
                        help="Only clips with at most N down-votes (Common Voice down_votes). (default: no limit)")
    parser.add_argument("--drop_digits", action="store_true",
                        help="Drop transcripts written with digits, as before numbers were read. (default: read "
                             "them as Kurmanji words, 25 as bîst û pênc, counted under texts repaired)")
    parser.add_argument("--no_trim", action="store_true", help="Keep leading and trailing silence. (default: trim it)")
    parser.add_argument("--trim_db", type=float, default=40.0,
                        help="Trim edges quieter than this many dB below the clip's loudest part. (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="Decoding processes; 1 decodes in this process. (default: all cores, %(default)s)")
    args = parser.parse_args(argv)

    if args.min_duration <= 0 or args.max_duration <= args.min_duration:
        parser.error("need 0 < --min_duration < --max_duration")
    if args.min_chars_per_second < 0 or args.max_chars_per_second <= args.min_chars_per_second:
        parser.error("need 0 <= --min_chars_per_second < --max_chars_per_second")
    if args.max_clips is not None and args.max_clips < 1:
        parser.error("--max_clips must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.speaker and args.top_speakers:
        parser.error("use --speaker or --top_speakers, not both")
    if args.top_speakers is not None and args.top_speakers < 1:
        parser.error("--top_speakers must be at least 1")
    for flag in ("min_upvotes", "max_downvotes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            parser.error(f"--{flag} must be at least 0")
    if run_folder.within(args.input, args.output_dir):
        parser.error(f"--input {args.input} lies in --output_dir {args.output_dir} (links followed), where stale "
                     "WAVs are deleted: choose another --output_dir")
    return args


def main(argv=None):
    """Prepare --input into --output_dir; returns the report. A run that cannot go on ends with one line on
    stderr and SystemExit: 2, or 130 when interrupted (Ctrl-C, SIGTERM)."""
    args = parse_args(argv)
    lock = None
    # SIGTERM ends the run as Ctrl-C does, through the finally blocks that save the decode cache.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        lock = run_folder.OutputLock(args.output_dir).acquire()
        # 1. Read the clip list and the voice's alphabet.
        source, header, rows, malformed = sources.read_clip_list(args)
        selection.check_columns(args, header)
        tokenizer, vocab = speech.load_vocab(args.model)
        # 2. Text first: it is cheap, and a clip whose text the voice cannot say is never decoded.
        candidates, counts = selection.choose_clips(args, rows, malformed, vocab)
        # 3. Reuse what an earlier run measured with the same audio settings; decode the rest in parallel.
        decoding = training_set.make_wavs(args, source, candidates, tokenizer)
        # 4. Write speakers.csv and metadata.csv in input order, remove WAVs they do not list, report.
        kept, dropped_list = selection.tally(candidates, decoding.outcomes, counts.dropped)
        training_set.write_clip_lists(args.output_dir, kept)
        report = training_set.write_report(args, source, kept, counts, dropped_list, decoding)
        if not kept:
            raise run_errors.TrainingError(f"no clip was kept from {args.input} "
                                           f"(see {os.path.join(args.output_dir, training_set.REPORT_NAME)})")
    except (run_errors.TrainingError, OSError, KeyboardInterrupt) as err:
        if isinstance(err, OSError):  # writing our own outputs (a full disk): no temp file may stay behind
            for folder in (args.output_dir, os.path.join(args.output_dir, "wavs")):
                run_folder.remove_stale_temps(folder)
        raise SystemExit(run_errors.report_fatal(err, args.output_dir, interrupted=INTERRUPTED)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if lock:
            lock.release()
    return report


if __name__ == "__main__":
    main()
