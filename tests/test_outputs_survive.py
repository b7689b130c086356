"""Issue 21, "Never lose the night": a full disk while saving the final or best model is one clear line
and keeps the model saved before; a swap cut short between its renames loses nothing; of two processes
that take over the same stale output-folder lock exactly one wins."""

import builtins
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import safetensors
import safetensors.torch
from transformers import VitsModel

import models
import run_errors
import run_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENOSPC = "No space left on device"


@pytest.fixture(scope="module")
def voice(tiny_model_dir):
    """(model, tokenizer, critic) as a run holds them."""
    model, tokenizer = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    return model, tokenizer, models.VitsDiscriminator(max_channels=64)


@pytest.fixture(scope="module")
def saved_voice(voice, tmp_path_factory):
    """A folder export_voice wrote: the model saved before the one that fails."""
    out = str(tmp_path_factory.mktemp("saved") / "final_model")
    models.export_voice(*voice, out)
    return out


def contents(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def run_with_saved_model(saved_voice, tmp_path, where):
    """An output folder holding the model saved before, at `where` (final_model or checkpoints/best_model)."""
    out = str(tmp_path / "run" / where)
    shutil.copytree(saved_voice, out)
    return out


def in_temp_folder(path):
    """A file export_voice writes into its hidden temp folder (`.final_model.<pid>.tmp/...`)."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))).endswith(f".{os.getpid()}.tmp")


class FullDisk:
    """A file whose writes stop half-way with ENOSPC, as write() does on a full disk (that OSError names no
    file: open() and write() do not know it)."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, ENOSPC)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_the_disk(monkeypatch, how):
    """Make the disk fill at one point of export_voice (what each writer really raises on a full disk,
    seen on a small tmpfs: SafetensorError "(os error 28)", an OSError from write(), torch.save's
    RuntimeError "unexpected pos", which atomic_torch_save turns back into that OSError)."""
    if how in ("config.json", "vocab.json", "tokenizer_config.json", "discriminator.pt"):
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            name = os.path.basename(str(file))
            if "w" in mode and in_temp_folder(file) and (name == how or name.startswith(f".{how}.")):
                return FullDisk(f)
            return f
        monkeypatch.setattr(builtins, "open", open_)
    elif how in ("weights", "weights_oserror", "weights_swallowed"):
        import transformers.modeling_utils

        def save_file(tensors, filename, metadata=None):
            data = safetensors.torch.save(tensors, metadata)
            with open(filename, "wb") as f:
                f.write(data[:len(data) // 2])
            if how == "weights":
                raise safetensors.SafetensorError(f"Error while serializing: I/O error: {ENOSPC} (os error 28)")
            if how == "weights_oserror":
                raise OSError(errno.ENOSPC, ENOSPC, filename)
            # weights_swallowed: a writer that lost the error and returned as if all was written
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    elif how == "fsync":  # a file system that reports the full disk only when the data goes to disk (NFS)
        real_open, real_fsync, opened = os.open, os.fsync, {}

        def os_open(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            opened[fd] = str(path)
            return fd

        def fsync(fd):
            path = opened.get(fd, "")
            if in_temp_folder(path) and os.path.basename(path) == "model.safetensors":
                raise OSError(errno.ENOSPC, ENOSPC)
            return real_fsync(fd)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "fsync", fsync)
    elif how in ("rename_old_aside", "rename_new_in"):
        real_replace = os.replace

        def replace(src, dst):
            if how == "rename_old_aside" and str(dst).endswith(".old") or \
                    how == "rename_new_in" and os.path.isdir(src) and str(src).endswith(f".{os.getpid()}.tmp"):
                raise OSError(errno.ENOSPC, ENOSPC, src, None, dst)
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    else:
        raise ValueError(how)


FULL_DISK_POINTS = ["config.json", "weights", "weights_oserror", "vocab.json", "tokenizer_config.json",
                    "discriminator.pt", "fsync", "rename_old_aside", "rename_new_in"]


@pytest.mark.parametrize("how", FULL_DISK_POINTS + ["weights_swallowed"])
def test_a_full_disk_while_saving_keeps_the_model_saved_before(voice, saved_voice, tmp_path, monkeypatch, capsys,
                                                              how):
    where = "checkpoints/best_model" if how.startswith("rename") or how == "vocab.json" else "final_model"
    out = run_with_saved_model(saved_voice, tmp_path, where)
    before = contents(out)
    fill_the_disk(monkeypatch, how)
    with pytest.raises(OSError) as raised:
        models.export_voice(*voice, out)
    monkeypatch.undo()
    assert contents(out) == before  # byte for byte
    assert os.listdir(os.path.dirname(out)) == [os.path.basename(out)]  # no temp folder, no .old
    VitsModel.from_pretrained(out)
    err = raised.value
    assert err.filename == out
    if how == "weights_swallowed":
        assert err.errno == errno.EIO and "model.safetensors came out incomplete" in err.strerror
    else:
        assert err.errno == errno.ENOSPC and err.strerror.startswith(ENOSPC)
    assert "the model saved there before is kept" in err.strerror
    # What the commands print (run_errors.report_fatal): one line naming the folder and the cause.
    capsys.readouterr()  # progress bars
    assert run_errors.report_fatal(err, str(tmp_path / "run")) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {out}: {err.strerror}"]


def test_a_full_disk_on_the_first_save_leaves_nothing_behind(voice, tmp_path, monkeypatch):
    out = str(tmp_path / "run" / "final_model")
    fill_the_disk(monkeypatch, "weights")
    with pytest.raises(OSError, match="no model is saved there") as raised:
        models.export_voice(*voice, out)
    assert raised.value.filename == out
    assert os.listdir(tmp_path / "run") == []


def interrupted_swap(saved_voice, tmp_path, where="final_model"):
    """What a process killed between replace_dir's two renames leaves: the model saved before moved aside
    to .old, the new one complete in the killed process's hidden temp folder, and nothing at `where`."""
    out = run_with_saved_model(saved_voice, tmp_path, where)
    shutil.copytree(out, os.path.join(os.path.dirname(out), ".final_model.999999999.tmp"))
    os.replace(out, out + ".old")
    return out


def test_a_swap_cut_short_between_its_renames_is_mended_by_the_next_save(voice, saved_voice, tmp_path, monkeypatch):
    out = interrupted_swap(saved_voice, tmp_path)
    before = contents(out + ".old")
    # The next save fails on a full disk: the model saved before is back in place, whole.
    fill_the_disk(monkeypatch, "weights")
    with pytest.raises(OSError, match="the model saved there before is kept"):
        models.export_voice(*voice, out)
    monkeypatch.undo()
    assert contents(out) == before and not os.path.exists(out + ".old")
    VitsModel.from_pretrained(out)

    # Cut short again; the next save works: the new model in place, no .old left.
    os.replace(out, out + ".old")
    models.export_voice(*voice, out)
    assert not os.path.exists(out + ".old")
    assert set(contents(out)) == set(before)
    VitsModel.from_pretrained(out)

    # Cut short while deleting the old copy (after the swap): the new model is kept, the rest of .old goes.
    shutil.copytree(out, out + ".old")
    os.remove(os.path.join(out + ".old", "model.safetensors"))
    after = contents(out)
    fill_the_disk(monkeypatch, "discriminator.pt")
    with pytest.raises(OSError, match="the model saved there before is kept"):
        models.export_voice(*voice, out)
    assert contents(out) == after and not os.path.exists(out + ".old")


def test_a_failed_swap_puts_the_old_model_back_before_raising(saved_voice, tmp_path, monkeypatch):
    out = run_with_saved_model(saved_voice, tmp_path, "final_model")
    new = str(tmp_path / "run" / ".final_model.1.tmp")
    shutil.copytree(out, new)
    os.remove(os.path.join(new, "discriminator.pt"))
    before = contents(out)
    real_replace = os.replace

    def replace(src, dst):
        if src == new:
            raise KeyboardInterrupt  # Ctrl-C between the two renames
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        models.replace_dir(new, out)
    assert contents(out) == before and not os.path.exists(out + ".old")


# ---------------------------------------------------------------------------------------------------- the lock

HOST = socket.gethostname()
A, B = dict(pid=910001, started=1000.0, host=HOST), dict(pid=910002, started=2000.0, host=HOST)
STALE = dict(pid=910009, started=9.0, host=HOST)  # a run that crashed


def write_lock(path, holder):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(holder, f)


class Interleaving:
    """Two OutputLocks of two "processes" (A and B: faked owners) that both find the same stale lock: B
    runs its whole acquire() at A's `at`-th step (a call of os.open, os.remove, os.stat, read_lock or
    process_running), or after A when A takes fewer steps."""

    def __init__(self, monkeypatch, folder, at):
        owners = iter([A, B])
        monkeypatch.setattr(run_folder, "this_process", lambda: next(owners))
        self.a, self.b = run_folder.OutputLock(folder), run_folder.OutputLock(folder)
        self.at, self.steps, self.actor, self.results = at, 0, None, {}
        self.running = {A["pid"], B["pid"]}
        monkeypatch.setattr(run_folder, "process_running", self.step(lambda pid, started=None: pid in self.running))
        monkeypatch.setattr(run_folder, "read_lock", self.step(run_folder.read_lock))
        for name in ("open", "remove", "stat"):
            monkeypatch.setattr(os, name, self.step(getattr(os, name)))

    def step(self, real):
        def call(*args, **kwargs):
            if self.actor == "a":
                self.steps += 1
                if self.steps == self.at:
                    self.run("b")
            return real(*args, **kwargs)
        return call

    def run(self, who):
        before, self.actor = self.actor, who
        try:
            getattr(self, who).acquire()
            self.results[who] = "won"
        except run_folder.FolderInUse:
            self.results[who] = "in use"
        finally:
            self.actor = before

    def race(self):
        self.run("a")
        if "b" not in self.results:
            self.run("b")
        return self.results


@pytest.mark.parametrize("at", range(1, 16))
def test_two_takers_of_one_stale_lock_cannot_both_win(tmp_path, monkeypatch, at):
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    write_lock(os.path.join(folder, run_folder.LOCK_NAME), STALE)
    race = Interleaving(monkeypatch, folder, at)
    results = race.race()
    monkeypatch.undo()
    assert sorted(results.values()) == ["in use", "won"], results
    winner = race.a if results["a"] == "won" else race.b
    assert run_folder.read_lock(winner.path) == winner.owner
    assert os.listdir(folder) == [run_folder.LOCK_NAME]  # no claim left
    winner.release()
    assert os.listdir(folder) == []


@pytest.mark.parametrize("claim", ["dead claimant", "unreadable"])
def test_a_claim_left_by_a_killed_process_is_taken_over_too(tmp_path, claim):
    me = run_folder.this_process()
    stale = dict(me, pid=STALE["pid"], started=STALE["started"])
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    lock_path = os.path.join(folder, run_folder.LOCK_NAME)
    write_lock(lock_path, stale)
    _, identity, _ = run_folder.lock_identity(lock_path)
    claim_path = f"{lock_path}.{identity}.claim"
    if claim == "unreadable":  # killed between creating it and writing it
        open(claim_path, "w").close()
        old = time.time() - 2 * run_folder.UNREADABLE_LOCK_GRACE_S
        os.utime(claim_path, (old, old))
    else:
        write_lock(claim_path, dict(stale, pid=STALE["pid"] + 1))
    with run_folder.OutputLock(folder):
        assert run_folder.read_lock(lock_path) == me
        assert os.listdir(folder) == [run_folder.LOCK_NAME]
    assert os.listdir(folder) == []


WORKER = """
import os, sys, time
import run_folder
folder, sync, me, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def signal(name, text=""):
    with open(os.path.join(sync, name + ".tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(sync, name + ".tmp"), os.path.join(sync, name))

def wait(name):
    while not os.path.exists(os.path.join(sync, name)):
        time.sleep(0.001)

signal(f"ready.{me}")
for r in range(rounds):
    go = os.path.join(sync, f"go{r}")
    while not os.path.exists(go):  # spin: both start within microseconds of each other
        pass
    lock = run_folder.OutputLock(folder)
    try:
        lock.acquire()
        result = "won"
    except run_folder.FolderInUse:
        result = "in use"
    signal(f"result{r}.{me}", result)
    wait(f"end{r}")  # hold the folder until both have answered
    lock.release()
    signal(f"released{r}.{me}")
"""


def test_two_processes_taking_over_one_stale_lock_at_once_one_wins(tmp_path):
    """Real processes released at the same instant onto a stale lock, round after round."""
    rounds, deadline = 40, time.time() + 120
    folder, sync = str(tmp_path / "run"), str(tmp_path / "sync")
    os.makedirs(folder)
    os.makedirs(sync)
    lock_path = os.path.join(folder, run_folder.LOCK_NAME)
    # Stale because its PID now belongs to another process (this one): the take-over asks psutil.
    stale = dict(run_folder.this_process(), started=run_folder.this_process()["started"] - 3600)

    def wait(*names):
        while not all(os.path.exists(os.path.join(sync, name)) for name in names):
            assert time.time() < deadline, f"workers stuck waiting for {names}"
            assert all(w.poll() is None for w in workers), [w.stderr.read() for w in workers if w.poll() is not None]
            time.sleep(0.001)

    workers = [subprocess.Popen([sys.executable, "-c", WORKER, folder, sync, me, str(rounds)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in "xy"]
    try:
        wait("ready.x", "ready.y")
        outcomes = []
        for r in range(rounds):
            write_lock(lock_path, stale)
            open(os.path.join(sync, f"go{r}"), "w").close()
            wait(f"result{r}.x", f"result{r}.y")
            outcomes.append(sorted(open(os.path.join(sync, f"result{r}.{me}")).read() for me in "xy"))
            open(os.path.join(sync, f"end{r}"), "w").close()
            wait(f"released{r}.x", f"released{r}.y")
            assert os.listdir(folder) == [], os.listdir(folder)
        for w in workers:
            assert w.wait(timeout=max(1, deadline - time.time())) == 0, w.communicate()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    both = sum(outcome == ["won", "won"] for outcome in outcomes)
    assert all(outcome == ["in use", "won"] for outcome in outcomes), f"{both} of {rounds} rounds had two owners"
