"""The contract of a run folder's files, as speech.py is the contract between prepare and train: what
train_vits.py and train_feedback.py write into their output folder and everything that reads it afterwards
(the report page, the verdict, promote and rollback, the blind comparison, speak.py) agree on here.

It holds each name once: the files and folders of a run, the listening samples' names, the measures in
metrics.jsonl and report.json; their readers and atomic writers (run_folder.write_atomically); what makes a
voice folder whole and its fingerprint; the rule for which voice of a training folder is current; and the
command lines printed to say what to run next. No torch: a command that only reads a run (speak.py
--onnx, a promote) loads none of the training code.
"""

import glob
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import safetensors

from voicetune.common import run_errors
from voicetune.common import run_folder

# ----------------------------------------------------------------------------------------------------
# The files and folders of a run folder.

RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"
FINAL_MODEL = "final_model"
SAMPLES = "samples"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
REPORT = "report.json"  # a feedback run's before/after figures and its verdict
PROGRESS = "progress.json"
PAGE = "report.html"
COMPARE = "compare"  # a blind comparison's folder

# What a run leaves in its output_dir; the first three mean a run was started there.
RUN_MARKERS = (RUN_CONFIG, CHECKPOINTS, FINAL_MODEL)
RUN_OUTPUTS = RUN_MARKERS + (SAMPLES, METRICS, TENSORBOARD, REPORT, PROGRESS, PAGE, COMPARE)

# A feedback run's samples: samples/<BEFORE|AFTER>/<FEEDBACK_SAMPLES|EVAL_SAMPLES>/, the recordings in
# samples/RECORDED/ under the same names as the feedback samples.
BEFORE, AFTER, RECORDED = "before", "after", "recorded"
FEEDBACK_SAMPLES, EVAL_SAMPLES = "feedback", "eval"

# ----------------------------------------------------------------------------------------------------
# The measures: metrics.jsonl's keys and report.json's sets.

# The voice-quality measures (voice_quality.summarise_quality), compared before/after in report.json.
QUALITY_MEASURES = ("mcd", "dur_ratio", "dnsmos_ovrl")
# A feedback run's sets never trained on: the verdict judges the tune on these alone.
HELD_OUT = ("feedback", "original")
# Where each sentence of a blind comparison comes from (report.json's listening "kind"), in words.
SENTENCE_KINDS = {"held_out": "held-out feedback", "needs_work": "marked needs work", "good": "marked good",
                  "eval": "evaluation sentence"}


def quality_prefix(set_name):
    """eval_mcd, ... for train_vits.py's validation set; feedback_eval_mcd, ... for train_feedback.py's."""
    return "eval" if set_name == "val" else f"{set_name}_eval"


def metric_key(set_name, measure):
    """A validation set's measure as metrics.jsonl names it: <set>_mel, or <quality prefix>_<measure>."""
    return f"{set_name}_mel" if measure == "mel" else f"{quality_prefix(set_name)}_{measure}"


# ----------------------------------------------------------------------------------------------------
# The listening samples' names.

def epoch_samples(epoch):
    """The folder under samples/ of an epoch's listening samples."""
    return f"epoch_{epoch}"


def epoch_of(folder_name):
    """The epoch of an epoch_samples folder name, or None for another name."""
    return int(folder_name[6:]) if folder_name.startswith("epoch_") and folder_name[6:].isdigit() else None


def speaker_samples(speaker_id):
    """The sub-folder of a multi-speaker voice's samples for one speaker."""
    return f"speaker_{speaker_id}"


def sentence_sample(index):
    """The WAV of the index-th listening or evaluation sentence: 00.wav, 01.wav, ..."""
    return f"{index:02d}.wav"


def sentence_index(name):
    """The sentence number of a sentence_sample name, or None for another name."""
    stem, ext = os.path.splitext(name)
    return int(stem) if ext == ".wav" and stem.isdigit() else None


def sample_name(clip_name):
    """The WAV of a feedback clip's samples and recording: its path in the feedback folder made one name."""
    return os.path.splitext(clip_name.replace(os.sep, "_"))[0] + ".wav"


# ----------------------------------------------------------------------------------------------------
# Reading and writing the files (atomically: a reader never sees half a file; run_folder.read_json reads
# any of them, None while one is missing or half written).

def write_json(path, data):
    run_folder.write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False, default=str), durable=False)


def read_report(run_dir):
    return run_folder.read_json(os.path.join(run_dir, REPORT))


def write_report(run_dir, report):
    write_json(os.path.join(run_dir, REPORT), report)


def read_progress(run_dir):
    return run_folder.read_json(os.path.join(run_dir, PROGRESS))


def write_progress(run_dir, progress):
    write_json(os.path.join(run_dir, PROGRESS), progress)


def read_run_config(run_dir):
    return run_folder.read_json(os.path.join(run_dir, RUN_CONFIG))


def write_run_config(run_dir, info):
    write_json(os.path.join(run_dir, RUN_CONFIG), info)


def run_script(run_dir):
    """Which script's run `run_dir` holds, from its run_config.json (None when there is none)."""
    info = read_run_config(run_dir)
    if info is None:
        return None
    # Runs from before `script` was recorded: only feedback runs have --feedback_dir.
    return info.get("script") or ("train_feedback" if "feedback_dir" in info.get("args", {}) else "train_vits")



def claim_output_dir(args, script):
    """Lock args.output_dir for this run. A fresh run refuses a folder holding an earlier run unless
    --overwrite (which deletes that run's outputs, never the data or the cache); nothing ever writes into
    another script's run. Under torchrun only rank 0 claims it, for the whole run (None elsewhere)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = run_folder.OutputLock(args.output_dir).acquire()
    found = [name for name in RUN_MARKERS if os.path.isfile(os.path.join(args.output_dir, name))
             or os.path.isdir(os.path.join(args.output_dir, name)) and os.listdir(os.path.join(args.output_dir, name))]
    owner = run_script(args.output_dir)
    if owner not in (None, script):
        lock.release()
        raise run_errors.TrainingError(f"--output_dir {args.output_dir} holds a {owner}.py run; {script}.py never "
                                       "writes into it: choose another folder")
    if found and not args.resume:
        if not args.overwrite:
            lock.release()
            raise run_errors.TrainingError(f"--output_dir {args.output_dir} already holds a run ({', '.join(found)}): "
                                           "continue it with --resume auto, start it over with --overwrite, or "
                                           "choose another folder")
        for name in RUN_OUTPUTS:
            path = os.path.join(args.output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        print(f"--overwrite: deleted the earlier run in {args.output_dir} ({', '.join(found)})")
    return lock


def append_metrics(run_dir, record):
    # One write call per line, so a killed run never leaves half a record.
    with open(os.path.join(run_dir, METRICS), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def validation_records(run_dir):
    """{epoch: the last validation line of that epoch} from metrics.jsonl (training lines carry an lr)."""
    records = {}
    try:
        with open(os.path.join(run_dir, METRICS), encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a full disk
                if isinstance(record, dict) and "lr" not in record and isinstance(record.get("epoch"), int):
                    records[record["epoch"]] = record
    except OSError:
        pass
    return dict(sorted(records.items()))


def validated_sets(records):
    """The validation sets of the run in their order (the first one chooses the best model)."""
    names = []
    for record in records.values():
        for key in record:
            if key.endswith("_mel") and "_eval_" not in key and key[:-4] not in names:
                names.append(key[:-4])
    return names


# ----------------------------------------------------------------------------------------------------
# A voice folder: whole or not, and its fingerprint.

VOICE_FILES = ("config.json", "model.safetensors", "vocab.json", "tokenizer_config.json")
WEIGHTS = "model.safetensors"


def voice_missing(folder, files=VOICE_FILES):
    """What keeps `folder` from being a whole voice ("model.safetensors was not written", ...), or None."""
    for name in files:
        if not os.path.isfile(os.path.join(folder, name)) or not os.path.getsize(os.path.join(folder, name)):
            return f"{name} was not written"
    try:
        # Read as numpy: the header check needs no torch.
        with safetensors.safe_open(os.path.join(folder, WEIGHTS), "numpy") as weights:
            weights.keys()
    except Exception as err:  # SafetensorError: the file was cut short
        return f"{WEIGHTS} came out incomplete ({err})"
    return None


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def voice_fingerprint(folder):
    """{relative path: sha256} of every file of a voice folder: what "the same voice, bit for bit" means."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            hashes[os.path.relpath(path, folder).replace(os.sep, "/")] = file_sha256(path)
    return hashes


def model_fingerprint(folder):
    """sha256 of a voice folder's weights (None for a Hub name): which voice a run tuned (report.json and
    voices.json's model_sha256)."""
    path = os.path.join(folder, WEIGHTS)
    return file_sha256(path) if os.path.isfile(path) else None


# ----------------------------------------------------------------------------------------------------
# The training folder (--data_dir): the night's data and run, and what the mornings after keep beside them.

DEFAULT_DATA_DIR = "training"
PROMOTED = "voice"  # <data_dir>/voice: the voice a promote put to use
VERSIONS = "voices"  # <data_dir>/voices/NNN: every voice that was in use, and voices.json its history
FEEDBACK = "feedback"  # the listening page's recordings, the tune's --feedback_dir
SESSIONS = "sessions"  # listening sessions, a folder a day
FEEDBACK_MODELS = "feedback_models"  # feedback runs, a folder each, named by its start


SESSION = "session.json"  # a listening session's state, in its folder under sessions/
QUEUE = "queue.tsv"  # a listening session's sentences as the queue ranked them (feedback/listen_queue.py)


def newest_session(sessions_dir):
    """The folder of the session last written under `sessions_dir` (None when there is none): what --listen
    alone continues."""
    sessions = glob.glob(os.path.join(sessions_dir, "*", SESSION))
    return os.path.dirname(max(sessions, key=os.path.getmtime)) if sessions else None


def night_data_dir(voice):
    """The training folder the voice in folder `voice` belongs to, or None where nothing records one: a voice in
    use lives in it (<data_dir>/voice, <data_dir>/voices/NNN); a run's voice (final_model/, or
    checkpoints/best_model/) has its run's run_config.json, which names the --data_dir it trained on."""
    if not os.path.isdir(voice):
        return None  # a Hub voice: no training folder here
    folder = os.path.abspath(voice)
    parent = os.path.dirname(folder)
    if os.path.basename(folder) == PROMOTED:
        return parent
    if os.path.basename(parent) == VERSIONS:
        return os.path.dirname(parent)
    for run_dir in (parent, os.path.dirname(parent)):
        config = read_run_config(run_dir) or {}
        data_dir = config.get("args", {}).get("data_dir") if isinstance(config.get("args"), dict) else None
        if isinstance(data_dir, str) and data_dir:
            return data_dir
    return None



def current_voice(data_dir):
    """The voice in use: `<data_dir>/voice` when it is there and whole, else the night's `<data_dir>/final_model`.
    (voices.current_voice mends a half-done promote first, then asks this.)"""
    promoted, night = Path(data_dir) / PROMOTED, Path(data_dir) / FINAL_MODEL
    if promoted.is_dir():
        missing = voice_missing(str(promoted))
        if missing is None:
            return promoted
        print(f"warning: {promoted} is not a whole voice ({missing}): using {night}")
    return night


# ----------------------------------------------------------------------------------------------------
# What to run next: the command lines printed and shown on the pages. Each runs as printed, from the folder
# the command that printed it was run in: the Python the user ran, and every folder the command would not find
# by itself (the training folder, a feedback folder elsewhere, the session, the voice).

SENTENCES = os.path.join("examples", "sentences.txt")  # the sentences the hints give the listening page
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def as_typed(path):
    """`path` as a user types it in the current folder: relative when it lies under it, else absolute."""
    path, here = os.path.abspath(path), os.getcwd()
    try:
        under = os.path.commonpath([os.path.normcase(path), os.path.normcase(here)]) == os.path.normcase(here)
    except ValueError:  # another drive (Windows)
        under = False
    return os.path.relpath(path, here) if under else path


def interpreter():
    """The Python that runs this command, as the user would type it: relative when it lies under the current
    folder (.venv/bin/python, .venv\\Scripts\\python.exe), `python` when that is the one the PATH finds first,
    else its full path. Never resolved through links: a virtual environment's python is a link to another."""
    exe = sys.executable or "python"
    typed = as_typed(exe)
    if not os.path.isabs(typed):
        # A bare name would be looked up on the PATH (POSIX shells), not in the current folder.
        return typed if os.path.dirname(typed) else os.path.join(os.curdir, typed)
    found = shutil.which("python")
    if found and os.path.normcase(os.path.abspath(found)) == os.path.normcase(os.path.abspath(exe)):
        return "python"
    return exe


def sentences_file():
    """The repository's sentence file as the current folder reaches it (the hints' --listen)."""
    return as_typed(os.path.join(REPOSITORY, SENTENCES))


def command_line(*words):
    """A command to copy: words holding spaces in double quotes (as both cmd.exe and a POSIX shell read them)."""
    return " ".join(f'"{w}"' if " " in w else w for w in map(str, words))


def same_folder(a, b):
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def data_dir_flag(data_dir, voice=None):
    """--data_dir DATA_DIR for a printed train_feedback.py command, left out only when it is the default and the
    command would find the default by itself (`voice`'s run record names no other folder)."""
    if data_dir is None:
        return []
    found = (voice and night_data_dir(voice)) or DEFAULT_DATA_DIR
    if same_folder(data_dir, DEFAULT_DATA_DIR) and same_folder(found, DEFAULT_DATA_DIR):
        return []
    return ["--data_dir", data_dir]


def feedback_dir_flag(feedback_dir, data_dir):
    """--feedback_dir FOLDER unless it is the default under the training folder."""
    default = os.path.join(data_dir or DEFAULT_DATA_DIR, FEEDBACK)
    return [] if feedback_dir is None or same_folder(feedback_dir, default) else ["--feedback_dir", feedback_dir]


def script(name):
    """A command of the repository (train_feedback.py, ...) as the current folder reaches it."""
    return as_typed(os.path.join(REPOSITORY, name))


def feedback_command(*words):
    return command_line(interpreter(), script("train_feedback.py"), *words)


def compare_command(run_dir, data_dir=None):
    return feedback_command("--compare", run_dir, *data_dir_flag(data_dir, os.path.join(run_dir, FINAL_MODEL)))


def promote_command(run_dir, data_dir=None):
    return feedback_command("--promote", run_dir, *data_dir_flag(data_dir, os.path.join(run_dir, FINAL_MODEL)))


def rollback_command(data_dir):
    return feedback_command("--rollback", *data_dir_flag(data_dir))


def listen_command(sentences_or_session, model=None, data_dir=None, feedback_dir=None, speaker_id=None):
    return feedback_command("--listen", sentences_or_session, *(["--model", model] if model is not None else []),
                            *data_dir_flag(data_dir, model), *feedback_dir_flag(feedback_dir, data_dir),
                            *(["--speaker_id", speaker_id] if speaker_id is not None else []))


def tune_command(model, data_dir=None, feedback_dir=None, speaker_id=None):
    return feedback_command("--model", model, *data_dir_flag(data_dir, model),
                            *feedback_dir_flag(feedback_dir, data_dir),
                            *(["--speaker_id", speaker_id] if speaker_id is not None else []))


def resume_command(command, model, output_dir, data_dir=None):
    """Continue a train_vits.py run (its --data_dir given) or a train_feedback.py run in `output_dir`."""
    data = (["--data_dir", data_dir] if data_dir is not None else []) if command == "train_vits" else \
        data_dir_flag(data_dir, model)
    return command_line(interpreter(), script(f"{command}.py"), "--model", model, *data, "--output_dir", output_dir,
                        "--resume", "auto")
