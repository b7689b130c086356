"""The voice in use and its versions. `<data_dir>/voice/` is the current voice: the folder a server loads with
VitsModel.from_pretrained and the next session starts from. The versions it replaced are kept whole in
`<data_dir>/voices/NNN/`, and `<data_dir>/voices.json` records every version (number, source run, date,
verdict, key figures, whether it was forced) and every promote and rollback. Before the first promote the
current voice is the night's `<data_dir>/final_model`; the first promote records it as version 1 (where the
training folder holds none, the voice the tune started from), so --rollback always reaches the night's voice.

A promote or a rollback is a swap done by renames alone, which Windows allows (it cannot rename a folder
over another): the incoming voice is first whole on disk (a promote copies and checks the run's
final_model into voices/.incoming.<pid>.tmp; a rollback's is voices/NNN/), then a journal (voices/swap.json)
says what is about to happen, then `voice/` is renamed to voices/<its number>/ and the incoming folder to
`voice/`, then voices.json records it and the journal goes. A crash, a kill or a full disk at any point
leaves a whole voice: the next command that looks (current_voice, promote, rollback) mends a half-done swap
by the journal, forward once `voice/` was moved aside (the incoming folder is whole), else back (nothing
had changed). The folder lock on voices/ keeps two of them from swapping at once.
"""

import contextlib
import errno
import json
import os
import shutil
import time
from pathlib import Path

from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder

VOICE = run_files.PROMOTED
VERSIONS = run_files.VERSIONS
HISTORY = "voices.json"
JOURNAL = "swap.json"
NIGHT = run_files.FINAL_MODEL


def paths(data_dir):
    data_dir = Path(data_dir)
    return dict(voice=data_dir / VOICE, versions=data_dir / VERSIONS, history=data_dir / HISTORY,
                journal=data_dir / VERSIONS / JOURNAL, night=data_dir / NIGHT)


def version_dir(data_dir, number):
    return paths(data_dir)["versions"] / f"{number:03d}"


def current_voice(data_dir):
    """The voice in use (run_files.current_voice: `<data_dir>/voice` once a promote made it and it is whole,
    else `<data_dir>/final_model`), after a swap that a crash left half done is mended (when no other
    process is swapping right now)."""
    p = paths(data_dir)
    if p["journal"].is_file():
        try:
            with run_folder.OutputLock(str(p["versions"])):
                recover(data_dir)
        except run_folder.FolderInUse:
            pass  # a promote is under way: voice/ is whole before and after its renames
    return run_files.current_voice(data_dir)


# ----------------------------------------------------------------------------------------------------
# The history: voices.json.

def read_history(data_dir):
    """voices.json as {"current": N or None, "versions": [...], "events": [...]} (empty before the first promote)."""
    path = paths(data_dir)["history"]
    if not path.is_file():
        return dict(current=None, versions=[], events=[])
    try:
        with open(path, encoding="utf-8") as f:
            history = json.load(f)
        if "current" not in history or not isinstance(history["versions"], list) or not isinstance(
                history["events"], list):
            raise ValueError("no current, versions and events")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise run_errors.TrainingError(f"{path}: not a voice history ({err}); move it away only if "
                                       f"{paths(data_dir)['voice']} is the voice you want") from None
    return history


def write_history(data_dir, history):
    run_folder.write_atomically(str(paths(data_dir)["history"]), json.dumps(history, indent=2, ensure_ascii=False))


def version(history, number):
    return next((v for v in history["versions"] if v["version"] == number), None)


# ----------------------------------------------------------------------------------------------------
# The swap and its journal.

def swap(data_dir, journal):
    """Make journal["incoming"] (a whole voice folder) the current voice, keeping the one in voice/ as
    voices/<journal["previous"]>/, and record journal["event"] (with journal["version"], if new)."""
    p = paths(data_dir)
    run_folder.write_atomically(str(p["journal"]), json.dumps(journal, indent=2, ensure_ascii=False))
    if p["voice"].is_dir():
        try:
            os.replace(p["voice"], version_dir(data_dir, journal["previous"]))
        except OSError as err:
            undo(data_dir, journal)
            raise run_errors.TrainingError(
                f"cannot move {p['voice']} aside ({err.strerror or err}); nothing changed. On Windows a program "
                "that has the voice open (a server that loaded it) keeps its folder from being renamed: stop it, "
                "then run the command again") from None
    finish(data_dir, journal)


def finish(data_dir, journal):
    p = paths(data_dir)
    if not p["voice"].is_dir():
        os.replace(journal["incoming"], p["voice"])
    history = read_history(data_dir)
    if journal["event"] not in history["events"]:
        if journal.get("new_version") and version(history, journal["new_version"]["version"]) is None:
            history["versions"] += journal.get("first", []) + [journal["new_version"]]
        history["current"] = journal["version"]
        history["events"].append(journal["event"])
        write_history(data_dir, history)
    os.remove(p["journal"])


def undo(data_dir, journal):
    """Back out a swap that had not moved voice/ aside yet: only the promote's incoming copy was made."""
    if journal["event"]["action"] == "promote":
        shutil.rmtree(journal["incoming"], ignore_errors=True)
    os.remove(paths(data_dir)["journal"])


def recover(data_dir):
    """Mend a swap a crash left half done (the caller holds the lock), by its journal; say what was done."""
    p = paths(data_dir)
    if p["journal"].is_file():
        mend(data_dir)
    # Copies made by promotes killed before their journal named them (a journal's own is mended above).
    run_folder.remove_stale_temps(str(p["versions"]))


def mend(data_dir):
    p = paths(data_dir)
    try:
        with open(p["journal"], encoding="utf-8") as f:
            journal = json.load(f)
    except (OSError, ValueError):
        os.remove(p["journal"])  # written atomically: a damaged journal was never acted on
        return
    what = f"{journal['event']['action']} of version {journal['version']}"
    if p["voice"].is_dir() and os.path.isdir(journal["incoming"]):
        undo(data_dir, journal)
        print(f"an interrupted {what} was undone: {p['voice']} is unchanged")
    elif not p["voice"].is_dir() and not os.path.isdir(journal["incoming"]):
        raise run_errors.TrainingError(f"{p['journal']}: a {what} was interrupted and neither {p['voice']} nor "
                                       f"{journal['incoming']} is there; the earlier versions are in "
                                       f"{p['versions']}")
    else:
        finish(data_dir, journal)
        print(f"an interrupted {what} was finished: {p['voice']} is version {journal['version']}")


def copy_voice(source, data_dir):
    """A checked copy of a voice folder in a temp folder inside voices/ (removed again if anything fails)."""
    tmp = run_folder.temp_name(str(paths(data_dir)["versions"] / "incoming"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp)
        run_folder.open_modes(tmp)  # copytree keeps a voice's modes: one saved readable by its owner alone too
        run_folder.sync_files(tmp)
        if run_files.voice_fingerprint(tmp) != run_files.voice_fingerprint(source):
            raise OSError(errno.EIO, f"the copy of {source} differs from it")
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # copytree gathers the errors of its files into one shutil.Error: the first says why.
        why = err.args[0][0][2] if isinstance(err, shutil.Error) and err.args and err.args[0] else (
            err.strerror or str(err))
        raise run_errors.TrainingError(f"cannot copy {source} into {paths(data_dir)['versions']}: {why}; nothing "
                                       "changed") from None
    return tmp


# ----------------------------------------------------------------------------------------------------
# Promote and roll back.

def promote(run_dir, data_dir, force=False):
    """Make RUN_DIR/final_model the current voice; refused (TrainingError, nothing changed) for a run whose
    verdict is reject, that has none, or that tuned another voice than the current one, unless `force`."""
    p = paths(data_dir)
    # The run folder too: a blind comparison served from it may still turn its verdict into reject.
    with locked(p["versions"], "another promote or rollback"), \
            locked(run_dir, "its blind comparison is being served, or the run is still going: promote it after"):
        recover(data_dir)
        report = run_files.read_report(run_dir)
        tuned = os.path.join(run_dir, NIGHT)
        if report is None or report.get("status") != "done":
            raise run_errors.TrainingError(f"--promote {run_dir}: not a finished feedback run (no report.json "
                                           "with status done)")
        missing = run_files.voice_missing(tuned)
        if missing:
            raise run_errors.TrainingError(f"--promote {run_dir}: {tuned} is not a whole voice ({missing})")
        history = read_history(data_dir)
        current = voice_in_use(data_dir, history) or input_voice(report)
        if current is not None and history["current"] is not None and \
                current.get("model_sha256") == run_files.model_fingerprint(tuned):
            print(f"--promote {run_dir}: already the current voice (version {current['version']}); nothing changed")
            return current["version"]
        refusals = promote_refusals(report, current)
        if refusals and not force:
            raise run_errors.TrainingError(f"--promote {run_dir} refused, nothing changed: " + "; ".join(refusals)
                                           + " (--force promotes it anyway, and the history records that)")
        number = max([v["version"] for v in history["versions"]] + [0 if current is None else current["version"]]) + 1
        date = time.strftime("%Y-%m-%d %H:%M:%S")
        verdict = report.get("verdict") or {}
        new_version = dict(version=number, source=os.path.abspath(run_dir), date=date,
                           verdict=verdict.get("decision"), decided_by=verdict.get("decided_by"),
                           reasons=verdict.get("reasons", []), figures=key_figures(report), forced=bool(refusals),
                           replaces=None if current is None else current["version"],
                           model_sha256=run_files.model_fingerprint(tuned))
        first = []
        if current is not None and history["current"] is None:  # the first promote records version 1
            first = [{k: v for k, v in current.items() if k != "folder"}]
            if not p["voice"].is_dir():
                # The night's voice is kept as a copy: final_model stays where train_vits.py left it. A copy
                # left by a promote killed before its journal is made again.
                shutil.rmtree(version_dir(data_dir, 1), ignore_errors=True)
                os.replace(copy_voice(current["folder"], data_dir), version_dir(data_dir, 1))
        incoming = copy_voice(tuned, data_dir)
        swap(data_dir, dict(version=number, previous=None if current is None else current["version"],
                            incoming=incoming, new_version=new_version, first=first,
                            event=dict(action="promote", version=number, source=new_version["source"], date=date,
                                       forced=bool(refusals),
                                       replaced=None if current is None else current["version"])))
    kept = f"; version {current['version']} is kept in {version_dir(data_dir, current['version'])}" if current else ""
    print(f"promoted {tuned} as version {number}: {p['voice']} (verdict {new_version['verdict']}"
          + (", forced" if refusals else "") + f"){kept}; the history is in {p['history']}")
    if current is not None:
        print(f"back to version {current['version']} with: {run_files.rollback_command(str(data_dir))}")
    return number


def rollback(data_dir):
    """Make the version the current one replaced current again, exactly (the same files); recorded."""
    p = paths(data_dir)
    with locked(p["versions"], "another promote or rollback"):
        recover(data_dir)
        history = read_history(data_dir)
        current = version(history, history["current"]) if history["current"] else None
        if current is None or not p["voice"].is_dir():
            raise run_errors.TrainingError(f"--rollback: no promoted voice in {p['voice']} (nothing to roll back)")
        target = current.get("replaces")
        if target is None:
            raise run_errors.TrainingError(f"--rollback: {p['voice']} is version {current['version']}, the first; "
                                           "there is no earlier version")
        folder = version_dir(data_dir, target)
        missing = run_files.voice_missing(str(folder)) if folder.is_dir() else f"{folder} is gone"
        if missing:
            raise run_errors.TrainingError(f"--rollback: version {target} is not whole ({missing})")
        date = time.strftime("%Y-%m-%d %H:%M:%S")
        swap(data_dir, dict(version=target, previous=current["version"], incoming=str(folder),
                            event=dict(action="rollback", version=target, replaced=current["version"], date=date)))
    print(f"rolled back: {p['voice']} is version {target} again; version {current['version']} is kept in "
          f"{version_dir(data_dir, current['version'])}")
    return target


@contextlib.contextmanager
def locked(folder, holder):
    """`folder`'s lock for one promote or rollback; one line naming the likely `holder` when another process
    holds it."""
    lock = run_folder.OutputLock(str(folder))
    # A refusal leaves no voices/ (nor a training folder) that the lock alone made.
    with run_folder.removed_if_left_empty(folder):
        try:
            lock.acquire()
        except run_folder.FolderInUse as err:
            raise run_errors.TrainingError(f"{err} ({holder}); nothing changed") from None
        try:
            yield
        finally:
            lock.release()


def voice_in_use(data_dir, history):
    """The current version's record and its "folder": once promoted, the history's; before the first promote,
    the voice run_files.current_voice picks (voice/ put there by hand, else the night's final_model) as
    version 1, or None when there is no whole local voice at all."""
    p = paths(data_dir)
    if history["current"] is not None:
        return dict(version(history, history["current"]), folder=str(p["voice"]))
    folder = run_files.current_voice(data_dir)
    if p["voice"].is_dir() and folder != p["voice"]:
        # The swap would keep the broken folder as version 1.
        raise run_errors.TrainingError(f"{p['voice']}, put there by hand, is not a whole voice: move it away "
                                       "first; nothing changed")
    if folder == p["voice"]:  # put there by hand before any promote: it becomes version 1 as it is
        return dict(version=1, source=str(folder), date=None, verdict=None, figures={}, forced=False,
                    replaces=None, model_sha256=run_files.model_fingerprint(str(folder)), folder=str(folder))
    if run_files.voice_missing(str(folder)) is None:
        return dict(version=1, source=str(folder.resolve()), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                    verdict=None, figures={}, forced=False, replaces=None,
                    model_sha256=run_files.model_fingerprint(str(folder)), folder=str(folder))
    return None


def input_voice(report):
    """Before the first promote into a training folder that holds no voice of its own (the night trained
    elsewhere, or its data was prepared apart from it): the voice the tune started from, report.json's "model",
    as version 1, so that --rollback reaches it; None when that is no whole local voice."""
    folder = report.get("model")
    if not isinstance(folder, str) or not os.path.isdir(folder) or run_files.voice_missing(folder) is not None:
        return None
    return dict(version=1, source=os.path.abspath(folder), date=time.strftime("%Y-%m-%d %H:%M:%S"), verdict=None,
                figures={}, forced=False, replaces=None, model_sha256=run_files.model_fingerprint(folder),
                folder=folder)


def promote_refusals(report, current):
    """Why a run may not become the current voice: its verdict, or a verdict about another voice."""
    verdict = report.get("verdict")
    if verdict is None:
        return ["the run has no verdict (it ran before verdicts existed)"]
    refusals = []
    if verdict["decision"] != "keep":
        refusals.append("its verdict is reject: " + "; ".join(r.split(": ", 1)[1] for r in verdict["reasons"]
                                                              if r.startswith("reject")))
    tuned_from = report.get("model_sha256")
    if current is not None and tuned_from and tuned_from != current.get("model_sha256"):
        refusals.append(f"it tuned {report.get('model')}, not the current voice (version {current['version']}): "
                        "its verdict compares it with that one")
    return refusals


def key_figures(report):
    """What voices.json keeps of a run's report: the held-out figures before and after."""
    figures = {f"{name}_mel": report["validation_mel"].get(name) for name in run_files.HELD_OUT}
    for key in ("mcd", "dur_ratio"):
        if key in (report.get("quality") or {}):
            figures[f"original_{key}"] = report["quality"][key].get("original")
    if report.get("intelligibility"):
        figures["cer"] = {k: report["intelligibility"][k] for k in ("before", "after")}
    return figures
