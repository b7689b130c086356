"""train_feedback.py's flags: train_vits.py's training flags with a short fine-tune's defaults, the feedback,
listening, blind comparison, verdict and voice-in-use flags, their checks, and the paths they leave open
decided from the training folder (--data_dir, found from the voice's own run record when not given).
No torch: --help, every refusal, --promote and --rollback answer at once."""

import math
import os

from voicetune.common import page_server
from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.common import speech
from voicetune.feedback import verdict
from voicetune.night import training_flags
from voicetune.voice import voices

VAL_SIZE = 100  # --val_size here: the held-out clips' cap (the listening page counts with it)
QUEUE_SIZE = 20  # sentences of a session drawn from the listening queue when --listen names no number



def build_parser(description):
    p = training_flags.build_parser(description)
    p.set_defaults(model=None, data_dir=None, lr=1e-5, warmup_steps=20, output_dir=None,
                   target_hours=None, val_size=VAL_SIZE, benchmark_samples=50)
    g = p.add_argument_group("feedback")
    g.add_argument("--feedback_dir", default=None,
                   help="Folder with the recorded clips (WAV, FLAC, OGG, MP3; any rate, mono or stereo), each "
                        "with its text: NAME.wav + NAME.txt, or a metadata.csv of filename|text rows (which wins "
                        "when both exist). (default: <data_dir>/feedback, where the listening page saves)")
    g.add_argument("--feedback_only", action="store_true",
                   help="Train on the feedback clips alone, without the night's training set: nothing is replayed "
                        "and no original clip is held out, so the verdict cannot judge the rest of the voice "
                        "and rejects the tune (promote it with --force).")
    g.add_argument("--replay_ratio", type=float, default=0.5,
                   help="Share of every batch taken from the original training set (--data_dir), so the voice "
                        "does not forget it; 0 trains on feedback alone. (default: %(default)s)")
    g.add_argument("--feedback_weight", type=float, default=50.0,
                   help="Times each feedback clip is used per epoch, where each replayed clip is used at most "
                        "once: how much more a feedback clip counts than a replayed one. Also sets the epoch "
                        "length: clips x weight / (1 - replay_ratio) items. (default: %(default)s)")
    g.add_argument("--target_minutes", type=float, default=None,
                   help="Wall-clock budget of the whole run in minutes, samples and report included; "
                        "replaces --target_hours. (default: 30)")
    g.add_argument("--speaker_id", type=int, default=None, metavar="ID",
                   help="For a multi-speaker voice (train_vits.py --speakers): whose voice the feedback clips "
                        "train and the samples, the session kit and the listening page speak with; replayed clips "
                        "keep their own speakers, and the tuned voice keeps them all. Ids and their Common Voice "
                        "client_ids are in speakers.json beside --model. (default: the speaker with the most "
                        "clips)")
    g.add_argument("--make_session", default=None, metavar="SENTENCES.txt",
                   help="Only make a listening-session kit: speak each sentence of the file (UTF-8 text, one a "
                        "line, as examples/sentences.txt) with --model into --output_dir (default "
                        "<data_dir>/sessions/<date>/) with sNNN.txt, the text of each, then exit.")
    g = p.add_argument_group("blind comparison")
    g.add_argument("--compare", default=None, metavar="RUN_DIR",
                   help="Only serve a blind A/B listening test of the feedback run in RUN_DIR: each sentence (its "
                        "held-out feedback clips, the sentences marked in the listening session its feedback came "
                        "from, the evaluation sentences) spoken by the input voice and the tuned voice as A and B "
                        "in a random order, to as many listeners as come, each with their own choices; which is "
                        "which is shown to each once they have judged every pair. The finished listeners' "
                        "choices, pooled, go into RUN_DIR/report.json and the verdict. Served like --listen "
                        "(--host, --port, --allow_remote); running it again continues.")
    g = p.add_argument_group("listening session")
    g.add_argument("--listen", nargs="?", const="", default=None, metavar="N|SENTENCES.txt|SESSION",
                   help="Only serve the listening-session page: hear --model say each sentence, mark it, record "
                        "corrections into --feedback_dir. A number N starts a new session of the N sentences the "
                        "voice most likely says badly (the listening queue, drawn from the held-out clips' "
                        "transcripts, --pool files and examples/sentences.txt; one in five a random control; "
                        "docs/feedback.md); a sentence file (UTF-8, one a line) starts a new session of its "
                        "sentences, worst first (a --make_session kit); a kit or session folder continues it; no "
                        f"value: the newest session, or a queue of {QUEUE_SIZE} when there is none.")
    g.add_argument("--pool", action="append", default=None, metavar="SENTENCES.txt",
                   help="With --listen N: more sentences for the queue to choose from (UTF-8, one a line); give it "
                        "again for more files.")
    page_server.add_address_flags(g)
    g = p.add_argument_group("verdict (on held-out clips only: the tune is kept only if it is better)")
    g.add_argument("--max_worse_mel", type=float, default=verdict.TOLERANCES["max_worse_mel"],
                   help="How much worse the held-out original clips' mel L1 may get, as a share (0.03: 3%%), by "
                        "its mean or by a sure majority of clips, before the verdict is reject.")
    g.add_argument("--max_worse_mcd", type=float, default=verdict.TOLERANCES["max_worse_mcd"],
                   help="The same for their MCD-DTW (needs --eval_clips).")
    g.add_argument("--max_dur_drift", type=float, default=verdict.TOLERANCES["max_dur_drift"],
                   help="How much further from 1 their duration ratio (spoken / recorded) may move.")
    g.add_argument("--max_worse_cer", type=float, default=verdict.TOLERANCES["max_worse_cer"],
                   help="With --asr_model: how much the character error rate of the held-out and evaluation "
                        "sentences may rise (0.02: 2 points).")
    g.add_argument("--min_held_out", type=int, default=verdict.TOLERANCES["min_held_out"],
                   help="Fewest held-out clips a guard needs to judge; with fewer the verdict is reject and says "
                        "so.")
    g = p.add_argument_group("the voice in use (<data_dir>/voice, its versions in <data_dir>/voices)")
    g.add_argument("--promote", default=None, metavar="RUN_DIR",
                   help="Only make RUN_DIR/final_model the current voice, <data_dir>/voice (atomically; the one it "
                        "replaces is kept in <data_dir>/voices/NNN, the history in <data_dir>/voices.json), then "
                        "exit. A run whose verdict is reject is refused with its reasons.")
    g.add_argument("--rollback", action="store_true",
                   help="Only make the version the current voice replaced current again (the same files), then "
                        "exit.")
    g.add_argument("--force", action="store_true",
                   help="With --promote: promote a run the verdict rejected (recorded in voices.json).")
    # The new run folder is only decided after parsing (a timestamp, or the run --resume names).
    for action in p._actions:
        if action.dest == "output_dir":
            action.help = ("Where the tuned model, report.json, samples/ and checkpoints/ go; never inside "
                           "--model. (default: a new folder training/feedback_models/<date-time>)")
        elif action.dest == "target_hours":
            action.help = "Wall-clock budget in hours, instead of --target_minutes."
        elif action.dest == "data_dir":
            action.help = ("The training folder: the night's wavs/ + metadata.csv (replayed and held out), and "
                           "where the voice in use, its versions, the feedback, the sessions and the feedback runs "
                           "live. (default: the one --model, --promote's or --compare's run was trained on, from "
                           f"its run_config.json, else {run_files.DEFAULT_DATA_DIR})")
        elif action.dest == "model":
            action.help = ("The trained voice to improve (a folder, or a Hub name); it is only read. (default: "
                           "the current voice, <data_dir>/voice once a run was promoted, else "
                           "<data_dir>/final_model)")
    return p


def check_listen_args(parser, args, sessions_dir):
    """--listen's source (a number of sentences from the queue as args.listen_count, a sentence file, a session
    folder, or the newest session) and a safe address."""
    args.listen_count = None
    if args.listen == "":
        args.listen = run_files.newest_session(sessions_dir) or str(QUEUE_SIZE)
    if args.listen.isdigit() and not os.path.exists(args.listen):
        args.listen_count = int(args.listen)
        if args.listen_count < 1:
            parser.error(f"--listen {args.listen}: a session needs at least 1 sentence")
    elif not os.path.exists(args.listen):
        parser.error(f"--listen: no sentence file or session folder at {args.listen}")
    for path in args.pool or []:
        if not os.path.isfile(path):
            parser.error(f"--pool: no sentence file at {path}")
    if args.pool and args.listen_count is None:
        parser.error("--pool goes with --listen N (a new session from the listening queue)")
    if os.path.isdir(args.listen):
        args.output_dir = args.listen
    page_server.check_address_args(parser, args)


def check_data_dir(parser, args):
    """--data_dir: given, or the one the voice or the run at hand was trained on, else training/; a folder that
    is not there is refused (a typo must not turn into a tune on feedback alone)."""
    if args.data_dir is None:
        voice = args.model or (os.path.join(args.promote or args.compare, run_files.FINAL_MODEL)
                               if args.promote or args.compare else None)
        args.data_dir = (voice and run_files.night_data_dir(voice)) or run_files.DEFAULT_DATA_DIR
        if not os.path.isdir(args.data_dir) and args.data_dir != run_files.DEFAULT_DATA_DIR:
            parser.error(f"--data_dir: the training folder {args.data_dir} that {voice} names in its run record is "
                         "not here (give --data_dir)")
    if args.promote and not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir}: no such folder (the training folder whose voice it becomes)")
    if args.feedback_dir is None:
        args.feedback_dir = os.path.join(args.data_dir, run_files.FEEDBACK)


def parse(argv=None, description=None):
    """train_feedback.py's flags from `argv`, checked, with the paths they leave open decided (--data_dir,
    --feedback_dir, --model, --output_dir); `description` is the command's docstring."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    if args.target_minutes is not None and args.target_hours is not None:
        parser.error("give --target_minutes or --target_hours, not both")
    if args.target_minutes is not None:
        if not (math.isfinite(args.target_minutes) and args.target_minutes > 0):
            parser.error(f"--target_minutes must be positive, got {args.target_minutes}")
        args.target_hours = args.target_minutes / 60
    elif args.target_hours is None:
        args.target_hours = 0.5
    if args.promote is not None or args.rollback:
        if args.listen is not None or args.make_session or args.compare is not None or \
                (args.promote is not None and args.rollback):
            parser.error("--promote, --rollback, --compare, --listen and --make_session are separate jobs: give one")
        if args.promote is not None and not os.path.isdir(args.promote):
            parser.error(f"--promote: no run folder at {args.promote}")
        check_data_dir(parser, args)
        return args
    if args.force:
        parser.error("--force goes with --promote")
    for name in ("max_worse_mel", "max_worse_mcd", "max_dur_drift", "max_worse_cer"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            parser.error(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.min_held_out < 1:
        parser.error(f"--min_held_out must be at least 1, got {args.min_held_out}")
    if args.pool and args.listen is None:
        parser.error("--pool goes with --listen N (a new session from the listening queue)")
    if args.compare is not None:
        if args.listen is not None or args.make_session:
            parser.error("--compare serves a page of its own: give it without --listen or --make_session")
        if not os.path.isdir(args.compare):
            parser.error(f"--compare: no run folder at {args.compare}")
        check_data_dir(parser, args)
        args.output_dir = args.compare
        page_server.check_address_args(parser, args)
        training_flags.check_args(parser, args)
        return args  # both voices come from the run's own report.json
    missing = args.model and speech.missing_local_voice(args.model)
    if missing:
        parser.error(f"--model: {missing}")
    check_data_dir(parser, args)
    if args.model is None:
        try:
            args.model = str(voices.current_voice(args.data_dir))
        except run_errors.TrainingError as err:
            parser.error(str(err))
    sessions_dir = os.path.join(args.data_dir, run_files.SESSIONS)
    runs_dir = os.path.join(args.data_dir, run_files.FEEDBACK_MODELS)
    if not 0 <= args.replay_ratio < 1:
        parser.error(f"--replay_ratio must be at least 0 and below 1 (1 would leave no room for feedback), "
                     f"got {args.replay_ratio}")
    if not (math.isfinite(args.feedback_weight) and args.feedback_weight > 0):
        parser.error(f"--feedback_weight must be positive, got {args.feedback_weight}")
    tuning = not (args.make_session or args.listen is not None)
    if tuning and not args.feedback_only and not os.path.isfile(os.path.join(args.data_dir, "metadata.csv")):
        found = "no metadata.csv" if os.path.isdir(args.data_dir) else "no such folder"
        parser.error(f"--data_dir {args.data_dir}: {found}, so nothing to replay or hold out (give the folder "
                     "train_vits.py trained on, or --feedback_only to train on the recordings alone)")
    if args.make_session and not os.path.isfile(args.make_session):
        parser.error(f"--make_session: no sentence file at {args.make_session}")
    if args.listen is not None:
        if args.make_session:
            parser.error("give --make_session or --listen, not both (--listen makes the kit itself)")
        check_listen_args(parser, args, sessions_dir)
    if args.output_dir is None:
        if args.make_session or args.listen:
            args.output_dir = run_folder.new_run_dir(sessions_dir, "%Y-%m-%d")
        elif args.resume == "auto":
            args.output_dir = run_folder.newest_run_dir(runs_dir)
            if args.output_dir is None:
                parser.error(f"--resume auto: no feedback run with a checkpoint under {runs_dir} "
                             "(pass --output_dir)")
        elif args.resume:
            # .../<run>/checkpoints/checkpoint_epoch_N.pt continues in <run>
            args.output_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        else:
            args.output_dir = run_folder.new_run_dir(runs_dir)
    # The model that already works must never be overwritten: fit() writes final_model/, checkpoints/,
    # samples/ and a cache under output_dir, so the two folders may not overlap either way.
    if os.path.isdir(args.model) and run_folder.overlap(args.output_dir, args.model):
        parser.error(f"--output_dir {args.output_dir} overlaps --model {args.model}: the input model is never "
                     "written to; choose a new folder (the default is a new one under <data_dir>/feedback_models)")
    training_flags.check_args(parser, args)
    return args
