"""The voice in use: promote a run's voice to <data_dir>/voice, keep every version, roll back bit for bit,
refuse what the verdict rejected, never two at once, and a promote killed at any point leaves a whole voice;
then the whole loop twice over with real feedback runs of the tiny model."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from transformers import VitsModel

from voicetune.common import run_files
from voicetune.common import run_folder
import train_feedback as tf
from voicetune.voice import voices
from examples.make_release import SENTENCES
from voicetune.voice import voice_quality
from conftest import FEEDBACK_QUICK, MMS, fake_run, tiny_mms


@pytest.fixture(scope="module")
def voices_made(trained_voice, tmp_path_factory):
    """A data folder with the night's final_model, and three finished runs: two of it, one of run A's voice."""
    root = tmp_path_factory.mktemp("voices")
    night = shutil.copytree(trained_voice, root / "data" / "final_model")
    run_a = fake_run(str(root / "run_a"), str(night), "keep", 1)
    return dict(data=str(root / "data"), run_a=run_a,
                rejected=fake_run(str(root / "rejected"), str(night), "reject", 2),
                run_b=fake_run(str(root / "run_b"), os.path.join(run_a, "final_model"), "keep", 3))


@pytest.fixture
def data(voices_made, tmp_path):
    return str(shutil.copytree(voices_made["data"], tmp_path / "data"))


def same(a, b):
    return run_files.voice_fingerprint(a) == run_files.voice_fingerprint(b)


def history(data_dir):
    with open(os.path.join(data_dir, "voices.json"), encoding="utf-8") as f:
        return json.load(f)


def test_promote_keeps_every_version_and_rollback_restores_the_previous_bit_for_bit(voices_made, data, capsys):
    night = os.path.join(data, "final_model")
    night_files = run_files.voice_fingerprint(night)
    assert voices.current_voice(data) == voices.Path(night)
    assert tf.parse_args(["--data_dir", data, "--feedback_only"]).model == night

    assert tf.main(["--promote", voices_made["run_a"], "--data_dir", data]) == 0
    voice = os.path.join(data, "voice")
    assert same(voice, os.path.join(voices_made["run_a"], "final_model"))
    assert run_files.voice_fingerprint(os.path.join(data, "voices", "001")) == night_files
    assert run_files.voice_fingerprint(night) == night_files  # the night's output stays where train_vits.py left it
    assert f"promoted {os.path.join(voices_made['run_a'], 'final_model')} as version 2" in capsys.readouterr().out
    record = history(data)
    assert record["current"] == 2 and [v["version"] for v in record["versions"]] == [1, 2]
    first, second = record["versions"]
    assert first["source"] == os.path.realpath(night) and first["replaces"] is None
    assert second["source"] == os.path.abspath(voices_made["run_a"]) and second["replaces"] == 1
    assert second["verdict"] == "keep" and second["forced"] is False and second["date"]
    assert second["figures"]["original_mel"]["after"] == 2.41
    assert [e["action"] for e in record["events"]] == ["promote"]
    # The current voice is now the default --model of a feedback run, --make_session and --listen.
    assert voices.current_voice(data) == voices.Path(voice)
    sentences = os.path.join(data, "s.txt")
    with open(sentences, "w", encoding="utf-8") as f:
        f.write("roj baş\n")
    for extra in ([], ["--make_session", sentences], ["--listen", sentences]):
        assert tf.parse_args(["--data_dir", data, "--feedback_only"] + extra).model == voice
    assert VitsModel.from_pretrained(voice).config.sampling_rate == 16000

    # A second promote keeps version 2 in voices/002; a rollback brings it back, the same files.
    assert tf.main(["--promote", voices_made["run_b"], "--data_dir", data]) == 0
    assert same(voice, os.path.join(voices_made["run_b"], "final_model"))
    assert same(os.path.join(data, "voices", "002"), os.path.join(voices_made["run_a"], "final_model"))
    assert tf.main(["--rollback", "--data_dir", data]) == 0
    assert same(voice, os.path.join(voices_made["run_a"], "final_model"))
    assert same(os.path.join(data, "voices", "003"), os.path.join(voices_made["run_b"], "final_model"))
    assert "rolled back: " in capsys.readouterr().out
    assert tf.main(["--rollback", "--data_dir", data]) == 0
    assert run_files.voice_fingerprint(voice) == night_files
    record = history(data)
    assert record["current"] == 1
    assert [(e["action"], e["version"]) for e in record["events"]] == [("promote", 2), ("promote", 3),
                                                                       ("rollback", 2), ("rollback", 1)]
    # Version 1 replaced nothing: no further rollback, and nothing changes.
    before = run_files.voice_fingerprint(data)
    assert tf.main(["--rollback", "--data_dir", data]) == 2
    assert "the first; there is no earlier version" in capsys.readouterr().err
    assert run_files.voice_fingerprint(data) == before


@pytest.mark.skipif(os.name == "nt", reason="Windows files have no modes for group and others")
def test_a_promoted_voice_is_readable_by_a_server_running_as_another_user(voices_made, data, tmp_path):
    run = shutil.copytree(voices_made["run_a"], tmp_path / "run")
    os.chmod(run / "final_model" / "model.safetensors", 0o600)  # as safetensors saved it before its modes were set
    umask = os.umask(0o022)
    try:
        voices.promote(str(run), data)
    finally:
        os.umask(umask)
    voice = os.path.join(data, "voice")
    modes = {name: oct(os.stat(os.path.join(voice, name)).st_mode & 0o777) for name in os.listdir(voice)}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_rollback_returns_to_the_version_the_current_one_replaced_not_the_number_before_it(voices_made, data):
    tuned_a, tuned_b = (os.path.join(voices_made[run], "final_model") for run in ("run_a", "run_b"))
    assert tf.main(["--promote", voices_made["run_a"], "--data_dir", data]) == 0  # 2, replacing 1
    assert tf.main(["--promote", voices_made["run_b"], "--data_dir", data]) == 0  # 3, replacing 2
    assert tf.main(["--rollback", "--data_dir", data]) == 0  # back to 2
    # run_b tuned version 2's voice: promoted again it is version 4, and it replaced 2, not 3.
    assert tf.main(["--promote", voices_made["run_b"], "--data_dir", data]) == 0
    assert outline(data)[1][-1] == (4, 2, "keep", False)
    assert tf.main(["--rollback", "--data_dir", data]) == 0
    assert same(os.path.join(data, "voice"), tuned_a)
    assert same(os.path.join(data, "voices", "004"), tuned_b)
    record = history(data)
    assert record["current"] == 2 and record["events"][-1]["action"] == "rollback"
    assert (record["events"][-1]["version"], record["events"][-1]["replaced"]) == (2, 4)


@pytest.mark.parametrize("damage", ["cut short", "missing"])
def test_a_current_voice_that_is_not_whole_is_not_used(voices_made, data, damage, capsys):
    assert tf.main(["--promote", voices_made["run_a"], "--data_dir", data]) == 0
    weights = os.path.join(data, "voice", "model.safetensors")
    if damage == "missing":
        os.remove(weights)
    else:
        os.truncate(weights, os.path.getsize(weights) // 2)
    capsys.readouterr()
    night = os.path.join(data, "final_model")
    assert voices.current_voice(data) == voices.Path(night)
    assert f"warning: {os.path.join(data, 'voice')} is not a whole voice (model.safetensors " in capsys.readouterr().out
    assert tf.parse_args(["--data_dir", data, "--feedback_only"]).model == night


def test_what_a_promote_renames_in_is_on_disk_first(voices_made, data, monkeypatch):
    """Every file of the copied voice (and voices.json) is flushed to disk before the rename that makes it
    the real one: a power cut after the rename must not leave a voice of empty files."""
    events, names = [], {}  # names: each open file descriptor's path, the latest open of its number
    real_open, real_builtin_open, real_fsync, real_replace = os.open, open, os.fsync, os.replace

    def watching_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        names[fd] = os.path.abspath(path)
        return fd

    def watching_builtin_open(file, mode="r", *args, **kwargs):
        f = real_builtin_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)):
            names[f.fileno()] = os.path.abspath(file)
            if any(c in mode for c in "wax+"):
                events.append(("write", os.path.abspath(file)))
        return f

    def watching_fsync(fd):
        real_fsync(fd)
        events.append(("fsync", names.get(fd)))

    def watching_replace(src, dst):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "open", watching_open)
    monkeypatch.setattr(os, "fsync", watching_fsync)
    monkeypatch.setattr(os, "replace", watching_replace)
    monkeypatch.setattr("builtins.open", watching_builtin_open)
    voices.promote(voices_made["run_a"], data)
    monkeypatch.undo()

    def synced_before(i, folder):
        return {os.path.relpath(e[1], folder) for e in events[:i] if e[0] == "fsync" and e[1]
                and os.path.dirname(e[1]) == folder}

    voice, first = os.path.join(data, "voice"), os.path.join(data, "voices", "001")
    for target in (voice, first):  # the tuned voice, and the night's voice kept as version 1
        i, (_, incoming, _) = next((i, e) for i, e in enumerate(events) if e[0] == "replace" and e[2] == target)
        assert synced_before(i, incoming) == set(run_files.voice_fingerprint(target)), target
    # voices.json: written under another name, on disk, then renamed over the old one; never written in place.
    record = os.path.join(data, "voices.json")
    assert ("write", record) not in events
    i, (_, temp, _) = next((i, e) for i, e in enumerate(events) if e[0] == "replace" and e[2] == record)
    assert ("fsync", temp) in events[:i]


def test_a_rejected_run_is_refused_with_its_reasons_unless_forced(voices_made, data, capsys):
    before = run_files.voice_fingerprint(data)
    assert tf.main(["--promote", voices_made["rejected"], "--data_dir", data]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused, nothing changed: its verdict is reject: held-out original mel 1.862 " \
                                   "-> 2.410 (+29%, limit +3%): the voice got worse on what it knew" in err
    assert run_files.voice_fingerprint(data) == before and not os.path.exists(os.path.join(data, "voice"))
    # A run of another voice than the current one: its verdict compared it with that other voice.
    assert tf.main(["--promote", voices_made["run_b"], "--data_dir", data]) == 2
    assert "not the current voice (version 1)" in capsys.readouterr().err
    assert run_files.voice_fingerprint(data) == before

    assert tf.main(["--promote", voices_made["rejected"], "--data_dir", data, "--force"]) == 0
    assert ", forced)" in capsys.readouterr().out
    assert history(data)["versions"][1]["forced"] is True and history(data)["events"][0]["forced"] is True
    with pytest.raises(SystemExit):
        tf.parse_args(["--data_dir", data, "--force"])
    assert "--force goes with --promote" in capsys.readouterr().err


def test_two_promotes_never_run_at_once(voices_made, data, capsys):
    with run_folder.OutputLock(os.path.join(data, "voices")):  # this test process is the other promote
        assert tf.main(["--promote", voices_made["run_a"], "--data_dir", data]) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(data, "voice"))


def test_a_run_whose_comparison_is_being_served_is_not_promoted(voices_made, data, capsys):
    # --compare holds the run folder while listeners judge: their result may still make the verdict reject.
    with run_folder.OutputLock(voices_made["run_a"]):  # this test process is the comparison
        assert tf.main(["--promote", voices_made["run_a"], "--data_dir", data]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its blind comparison is being served" in err and "nothing changed" in err
    assert not os.path.exists(os.path.join(data, "voice")) and not os.path.exists(os.path.join(data, "voices.json"))
    assert tf.main(["--promote", voices_made["run_a"], "--data_dir", data]) == 0  # once it has ended
    assert not os.path.exists(os.path.join(voices_made["run_a"], run_folder.LOCK_NAME))


def test_a_full_disk_or_a_voice_held_open_changes_nothing(voices_made, data, monkeypatch, capsys):
    assert tf.main(["--promote", voices_made["run_a"], "--data_dir", data]) == 0
    before = run_files.voice_fingerprint(data)
    real_copy = shutil.copyfile

    def full(src, dst, **kwargs):
        copied = real_copy(src, dst, **kwargs)
        if os.fspath(src).endswith("model.safetensors"):  # the disk fills up half-way through the weights
            os.truncate(dst, os.path.getsize(dst) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return copied

    monkeypatch.setattr(shutil, "copyfile", full)
    assert tf.main(["--promote", voices_made["run_b"], "--data_dir", data]) == 2
    assert "No space left on device; nothing changed" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    assert run_files.voice_fingerprint(data) == before  # no copy left behind in voices/ either

    # A copy that comes out different without any error (a writer that swallowed it) is caught too.
    def silently_short(src, dst, **kwargs):
        copied = real_copy(src, dst, **kwargs)
        if os.fspath(src).endswith("model.safetensors"):
            os.truncate(dst, os.path.getsize(dst) - 1)
        return copied

    monkeypatch.setattr(shutil, "copyfile", silently_short)
    assert tf.main(["--promote", voices_made["run_b"], "--data_dir", data]) == 2
    assert "differs from it; nothing changed" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    assert run_files.voice_fingerprint(data) == before

    # Windows refuses to rename a folder a program has open (a server that loaded the voice).
    real_replace = os.replace

    def held_open(src, dst):
        if os.fspath(src) == os.path.join(data, "voice"):
            raise PermissionError(errno.EACCES, "Access is denied")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", held_open)
    assert tf.main(["--promote", voices_made["run_b"], "--data_dir", data]) == 2
    assert "a server that loaded it" in capsys.readouterr().err
    monkeypatch.setattr(os, "replace", real_replace)
    assert run_files.voice_fingerprint(data) == before


def outline(data_dir):
    """A history without its paths and dates: which versions, what each replaced, which swaps."""
    record = voices.read_history(data_dir)
    return (record["current"], [(v["version"], v["replaces"], v["verdict"], v["forced"]) for v in record["versions"]],
            [(e["action"], e["version"]) for e in record["events"]])


class Killed(BaseException):
    """The process dies here: nothing after it runs, no handler sees it (a KeyboardInterrupt would be caught)."""


def kill_at(monkeypatch, data_dir, at):
    """Die at the `at`-th file copied into, renamed in or removed from data_dir (the lock's own aside);
    returns the list of those seen (with `at` None: every point a swap passes)."""
    seen = []
    real = {"replace": os.replace, "remove": os.remove, "copyfile": shutil.copyfile}

    def hooked(name):
        def call(*args, **kwargs):
            path = os.fspath(args[1] if name == "copyfile" else args[0])
            if run_folder.within(path, data_dir) and run_folder.LOCK_NAME not in path:
                seen.append((name, os.path.relpath(path, data_dir)))
                if len(seen) == at:
                    raise Killed
            return real[name](*args, **kwargs)
        return call

    for name in real:
        monkeypatch.setattr(shutil if name == "copyfile" else os, name, hooked(name))
    return seen


@pytest.mark.parametrize("action", ["first promote", "promote", "rollback"])
def test_a_swap_killed_at_any_point_leaves_a_whole_voice_by_the_next_command(voices_made, data, tmp_path,
                                                                              monkeypatch, action):
    def do(folder):
        if action == "rollback":
            return voices.rollback(folder)
        return voices.promote(voices_made["run_b" if action == "promote" else "run_a"], folder, force=True)

    if action != "first promote":
        voices.promote(voices_made["run_a"], data)
    if action == "rollback":
        voices.promote(voices_made["run_b"], data)
    template = str(tmp_path / "template")
    shutil.copytree(data, template)
    old = run_files.voice_fingerprint(voices.current_voice(template))
    with monkeypatch.context() as m:
        points = kill_at(m, template, None)
        do(template)
    new = run_files.voice_fingerprint(voices.current_voice(template))
    assert new != old and len(points) >= 4
    for at in range(1, len(points) + 1):
        folder = str(tmp_path / f"killed_{at}")
        shutil.copytree(data, folder)
        with monkeypatch.context() as m:
            kill_at(m, folder, at)
            with pytest.raises(Killed):
                do(folder)
        # The next command finds a whole voice, the old or the new one, and the history agrees with it.
        current = voices.current_voice(folder)
        files = run_files.voice_fingerprint(current)
        assert files in (old, new), points[at - 1]
        assert VitsModel.from_pretrained(current) is not None
        if files == new:
            assert outline(folder) == outline(template), points[at - 1]
        assert not os.path.exists(os.path.join(folder, "voices", voices.JOURNAL))
        # The next swap goes through (and clears a copy a kill left behind); every version it keeps is whole.
        if files == old:
            do(folder)
            assert run_files.voice_fingerprint(voices.current_voice(folder)) == new
            assert outline(folder) == outline(template)
        assert [n for n in os.listdir(os.path.join(folder, "voices")) if n.endswith(".tmp")] == []
        for kept in voices.read_history(folder)["versions"]:
            if kept["version"] != voices.read_history(folder)["current"]:
                assert run_files.voice_missing(str(voices.version_dir(folder, kept["version"]))) is None


# ----------------------------------------------------------------------------------------------------
# The loop as a user runs it, twice, with real feedback runs of the tiny model.

def noise_feedback(folder):
    """Recordings that are only noise, each with a sentence: what a broken microphone hands over."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(6):
        sf.write(os.path.join(folder, f"audio_{i:03d}.wav"), (0.3 * rng.standard_normal(24000)).astype(np.float32),
                 16000)
        with open(os.path.join(folder, f"audio_{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(SENTENCES[i] + "\n")
    return folder


def test_two_sessions_keep_a_good_tune_reject_a_harmful_one_and_roll_back(trained_voice, feedback_dir,
                                                                         prepared_dataset, offline_cache, tmp_path,
                                                                         capsys):
    data = str(tmp_path / "training")
    shutil.copytree(prepared_dataset, data)
    shutil.copytree(trained_voice, os.path.join(data, "final_model"))
    night = run_files.voice_fingerprint(os.path.join(data, "final_model"))
    flags = ["--data_dir", data, "--max_steps", "4", "--eval_clips", "1"] + FEEDBACK_QUICK

    # Session 1: recordings of the sentences as they should sound, replayed with the original clips; heard
    # by MMS's multilingual recogniser with its Kurmanji adapter (a tiny random one: it cannot hear, so its
    # guard is given all the room it needs to pass).
    tiny_mms(offline_cache)
    voice_quality.load_asr.cache_clear()
    run1 = str(tmp_path / "run1")
    assert tf.main(["--feedback_dir", feedback_dir, "--output_dir", run1, "--lr", "2e-4", "--asr_model", MMS,
                    "--max_worse_cer", "1"] + flags) == 0
    voice_quality.load_asr.cache_clear()
    printed = capsys.readouterr().out
    with open(os.path.join(run1, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["model"] == os.path.join(data, "final_model")
    assert report["verdict"]["decision"] == "keep", report["verdict"]["reasons"]
    heard = report["intelligibility"]
    assert (heard["asr_model"], heard["asr_lang"], heard["sentences"]) == (MMS, "kmr-script_latin", 1 + 4)
    # Heard with the Kurmanji adapter and vocabulary, not the checkpoint's default language (English).
    transcripts = "".join(s["heard_before"] + s["heard_after"] for s in heard["per_sentence"])
    assert transcripts and set(transcripts) <= set("êçşîûa "), transcripts
    assert report["verdict"]["guards"]["intelligibility"]["before"] == heard["before"] >= 0
    assert "verdict: KEEP by the guards: every guard passed on held-out clips" in printed
    assert f"put it to use with: {run_files.interpreter()} train_feedback.py --promote {run1} --data_dir {data}" in \
        printed
    assert tf.main(["--promote", run1, "--data_dir", data]) == 0
    promoted = run_files.voice_fingerprint(os.path.join(data, "voice"))
    assert promoted == run_files.voice_fingerprint(os.path.join(run1, "final_model"))

    # Session 2 starts from the promoted voice: noise for recordings, no replay, a high learning rate.
    run2 = str(tmp_path / "run2")
    assert tf.main(["--feedback_dir", noise_feedback(str(tmp_path / "noise")), "--output_dir", run2,
                    "--replay_ratio", "0", "--lr", "0.1"] + flags) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(run2, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["model"] == os.path.join(data, "voice")
    result = report["verdict"]
    assert result["decision"] == "reject" and result["decided_by"] == "guards"
    harm = [r for r in result["reasons"] if r.startswith("reject: held-out original")]
    assert harm, result["reasons"]
    assert "verdict: REJECT by the guards: " in printed
    assert all(f"  {reason}\n" in printed for reason in result["reasons"])
    assert "(refused unless --force: the verdict is reject)" in printed

    # Its promote is refused with that reason and changes nothing; rollback restores the night's voice.
    assert tf.main(["--promote", run2, "--data_dir", data]) == 2
    assert harm[0].split(": ", 1)[1] in capsys.readouterr().err
    assert run_files.voice_fingerprint(os.path.join(data, "voice")) == promoted
    assert tf.main(["--rollback", "--data_dir", data]) == 0
    assert run_files.voice_fingerprint(os.path.join(data, "voice")) == night
    assert [(e["action"], e["version"]) for e in history(data)["events"]] == [("promote", 2), ("rollback", 1)]


def test_a_voice_put_in_place_by_hand_becomes_version_1(voices_made, data):
    shutil.copytree(os.path.join(voices_made["run_a"], "final_model"), os.path.join(data, "voice"))
    assert voices.current_voice(data) == voices.Path(data, "voice")
    voices.promote(voices_made["run_b"], data)  # run_b tuned that voice
    assert same(os.path.join(data, "voices", "001"), os.path.join(voices_made["run_a"], "final_model"))
    assert same(os.path.join(data, "voice"), os.path.join(voices_made["run_b"], "final_model"))
    assert outline(data) == (2, [(1, None, None, False), (2, 1, "keep", False)], [("promote", 2)])
    voices.rollback(data)
    assert same(os.path.join(data, "voice"), os.path.join(voices_made["run_a"], "final_model"))


def test_promoting_the_current_voice_again_says_so_and_changes_nothing(voices_made, data, capsys):
    assert tf.main(["--promote", voices_made["run_a"], "--data_dir", data]) == 0
    before = run_files.voice_fingerprint(data)
    capsys.readouterr()
    for force in ([], ["--force"]):
        assert tf.main(["--promote", voices_made["run_a"], "--data_dir", data] + force) == 0
        assert capsys.readouterr().out == (f"--promote {voices_made['run_a']}: already the current voice (version 2); "
                                           "nothing changed\n")
        assert run_files.voice_fingerprint(data) == before
        assert sorted(os.listdir(os.path.join(data, "voices"))) == ["001"]


def test_a_refused_promote_or_rollback_leaves_no_folder_behind(voices_made, data, tmp_path, capsys):
    # Refused by the verdict, before any promote: no voices/ appears beside the night.
    assert tf.main(["--promote", voices_made["rejected"], "--data_dir", data]) == 2
    assert sorted(os.listdir(data)) == ["final_model"]
    assert tf.main(["--rollback", "--data_dir", data]) == 2
    assert "nothing to roll back" in capsys.readouterr().err
    assert sorted(os.listdir(data)) == ["final_model"]
    # A rollback into a training folder that is not there makes none.
    nowhere = tmp_path / "no_such_home"
    assert tf.main(["--rollback", "--data_dir", str(nowhere)]) == 2
    assert not nowhere.exists()


def test_the_first_promote_keeps_the_voice_the_tune_started_from_where_the_training_folder_has_none(voices_made,
                                                                                                   tmp_path, capsys):
    # The demo's old layout: the data in one folder, the night (and the voice the tune started from) in another.
    data = tmp_path / "data"
    data.mkdir()
    night = os.path.join(voices_made["data"], "final_model")
    assert tf.main(["--promote", voices_made["run_a"], "--data_dir", str(data)]) == 0
    assert f"back to version 1 with: {run_files.interpreter()} " in capsys.readouterr().out
    record = history(data)
    assert [(v["version"], v["replaces"], v["source"]) for v in record["versions"]] == [
        (1, None, os.path.abspath(night)), (2, 1, os.path.abspath(voices_made["run_a"]))]
    assert run_files.voice_fingerprint(data / "voices" / "001") == run_files.voice_fingerprint(night)
    assert tf.main(["--rollback", "--data_dir", str(data)]) == 0
    assert run_files.voice_fingerprint(data / "voice") == run_files.voice_fingerprint(night)
