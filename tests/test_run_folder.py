"""run_folder.py: the output-folder lock (a live run holds it, a stale one is taken over by exactly one
taker, a run that ends never removes one another run took over), a folder holding a run refused unless
told, temp files, atomic writes that reach the disk before their rename (checkpoints, models, metadata),
and pool workers that end with their parent."""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from voicetune.night import checkpoints
from voicetune.night import clip_data
from voicetune.voice import models
import prepare_data
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.common import speech
import train_feedback as tf
import train_vits
from conftest import fake_checkpoint, one_error_line, QUICK, ROOT, tree


def test_a_live_run_holds_its_folder_against_every_script(prepared_dataset, tiny_model_dir, kmr_release, tmp_path,
                                                          capsys):
    out = str(tmp_path / "run")
    with run_folder.OutputLock(out):  # this test process is the live run
        assert train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out,
                        "--resume", "auto"] + QUICK) == 2
        assert "in use by another run" in one_error_line(capsys.readouterr().err)
        assert tf.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out,
                        "--overwrite"] + QUICK) == 2
        assert "in use by another run" in one_error_line(capsys.readouterr().err)
        with pytest.raises(SystemExit) as exit_info:
            prepare_data.main(["--input", kmr_release, "--model", tiny_model_dir, "--output_dir", out])
        assert exit_info.value.code == 2
        assert "in use by another run" in one_error_line(capsys.readouterr().err)
        assert os.listdir(out) == [run_folder.LOCK_NAME]
    assert os.listdir(out) == []  # released


def dead_process():
    """(pid, start time) of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_a_stale_lock_is_taken_over(tmp_path):
    pid, started = dead_process()
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    lock_path = os.path.join(folder, run_folder.LOCK_NAME)
    me = run_folder.this_process()
    for holder in (dict(me, pid=pid, started=started),  # crashed
                   dict(me, started=me["started"] - 3600)):  # its PID now belongs to this process
        with open(lock_path, "w") as f:
            json.dump(holder, f)
        with run_folder.OutputLock(folder):
            assert run_folder.read_lock(lock_path)["pid"] == os.getpid()
    with open(lock_path, "w") as f:
        json.dump(dict(me, host="another-machine"), f)
    with pytest.raises(run_folder.FolderInUse, match="another machine"):
        run_folder.OutputLock(folder).acquire()


def write_lock(path, holder):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(holder, f)


HOST = socket.gethostname()
STALE = dict(pid=910009, started=9.0, host=HOST)  # a run that crashed
A, B = dict(pid=910001, started=1000.0, host=HOST), dict(pid=910002, started=2000.0, host=HOST)


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
from voicetune.common import run_folder
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


def a_finished_run(folder, script):
    os.makedirs(os.path.join(folder, "checkpoints"))
    fake_checkpoint(os.path.join(folder, "checkpoints", "checkpoint_epoch_5.pt"), 50, 5)
    os.makedirs(os.path.join(folder, "final_model"))
    with open(os.path.join(folder, "run_config.json"), "w") as f:
        json.dump(dict(script=script, args={}), f)
    return tree(folder)


def test_a_fresh_run_refuses_a_folder_holding_a_run_unless_told(tmp_path, capsys):
    out = str(tmp_path / "training")
    before = a_finished_run(out, "train_vits")
    with open(os.path.join(out, "metadata.csv"), "w") as f:  # the data may share the folder (README)
        f.write("a.wav|roj baş\n")
    assert train_vits.main(["--output_dir", out] + QUICK) == 2
    error = one_error_line(capsys.readouterr().err)
    assert "already holds a run" in error and "--resume auto" in error and "--overwrite" in error
    assert tree(out) == sorted(before + ["metadata.csv"])

    args = train_vits.parse_args(["--output_dir", out, "--overwrite"] + QUICK)
    with run_files.claim_output_dir(args, "train_vits"):
        assert sorted(os.listdir(out)) == [run_folder.LOCK_NAME, "metadata.csv"]
    with pytest.raises(SystemExit):
        train_vits.parse_args(["--output_dir", out, "--overwrite", "--resume", "auto"])


def test_train_feedback_never_writes_into_a_train_vits_run(trained_voice, tmp_path, capsys):
    vits_run = str(tmp_path / "training")
    before = a_finished_run(vits_run, "train_vits")
    for extra in ([], ["--overwrite"], ["--resume", "auto"]):
        assert tf.main(["--model", trained_voice, "--feedback_only", "--output_dir", vits_run] + extra + QUICK) == 2
        assert "holds a train_vits.py run" in one_error_line(capsys.readouterr().err)
        assert tree(vits_run) == before


def test_temp_files_of_live_processes_are_left_alone(prepared_dataset, tmp_path):
    dead_pid, _ = dead_process()
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    live = os.path.join(cache, f".preload_0123.npz.{os.getppid()}.tmp")  # another run's cache being written
    dead = os.path.join(cache, f".preload_4567.npz.{dead_pid}.tmp")
    for path in (live, dead):
        open(path, "w").close()
    clip_data.load_clips(prepared_dataset, 16000, cache, 1)
    assert os.path.exists(live) and not os.path.exists(dead)
    assert len(glob.glob(os.path.join(cache, "preload_*.npz"))) == 1


def test_pool_workers_end_with_a_killed_parent():
    # The parent starts a pool as the scripts do, reports its worker, then kills itself.
    script = ("import os, signal\n"
              "from concurrent.futures import ProcessPoolExecutor\n"
              "from voicetune.common import run_folder\n"
              "pool = ProcessPoolExecutor(1, **run_folder.worker_setup())\n"
              "print(pool.submit(os.getpid).result(), flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL if hasattr(signal, 'SIGKILL') else signal.SIGTERM)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    worker = psutil.Process(int(proc.stdout.split()[0]))
    try:
        worker.wait(timeout=60)  # an upper bound only: it polls its parent every second
    except psutil.TimeoutExpired:
        worker.kill()
        pytest.fail("the pool worker outlived its killed parent")


@pytest.fixture
def disk_order(monkeypatch):
    """Every os.fsync and os.replace, in order: ("fsync", file id, bytes on disk then) and ("replace", src,
    {file id: bytes} of the file, or of each file in the folder, renamed)."""
    events, fsync, replace = [], os.fsync, os.replace

    def file_id(st):
        return st.st_dev, st.st_ino

    def recorded_fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", file_id(st), st.st_size))
        return fsync(fd)

    def recorded_replace(src, dst):
        paths = [os.path.join(src, n) for n in os.listdir(src)] if os.path.isdir(src) else [src]
        events.append(("replace", src, {file_id(os.stat(p)): os.path.getsize(p) for p in paths}))
        return replace(src, dst)
    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return events


def check_flushed_before_renamed(events):
    """Each temp file or folder renamed into place: every byte of each of its files fsynced before."""
    renamed = [(k, e) for k, e in enumerate(events) if e[0] == "replace"
               and run_folder.TEMP_PATTERN.fullmatch(os.path.basename(e[1]))]
    assert renamed
    for k, (_, src, files) in renamed:
        flushed = {(file, size) for kind, file, size in (e for e in events[:k] if e[0] == "fsync")}
        for file, size in files.items():
            assert (file, size) in flushed, f"{src}: a file of {size} bytes renamed into place before it was on disk"


def test_a_checkpoint_is_on_disk_before_it_is_renamed_into_place(tmp_path, disk_order):
    path = str(tmp_path / "checkpoint_epoch_1.pt")
    models.atomic_torch_save(dict(weights=torch.arange(50_000.0), epoch=1), path)
    check_flushed_before_renamed(disk_order)
    assert checkpoints.read_checkpoint(path)["epoch"] == 1


def test_a_model_is_on_disk_before_it_is_renamed_into_place(tiny_model_dir, tmp_path, disk_order):
    model, tokenizer = models.load_voice(tiny_model_dir)
    out = str(tmp_path / "final_model")
    for _ in range(2):  # the first save, and one that replaces it
        models.export_voice(model, tokenizer, models.VitsDiscriminator(max_channels=16), out)
        check_flushed_before_renamed(disk_order)
        disk_order.clear()
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_metadata_is_on_disk_before_it_is_renamed_into_place(tmp_path, disk_order):
    path = str(tmp_path / "metadata.csv")
    rows = [(f"clip_{i:04d}.wav", "Roj baş, hevalno.") for i in range(2000)]
    speech.write_metadata(path, rows)
    speech.write_metadata(path, rows[:10])
    check_flushed_before_renamed(disk_order)
    assert len(disk_order) == 4  # fsync, rename; fsync, rename


def test_a_run_that_ends_never_removes_a_lock_another_run_took_over(tmp_path):
    folder = str(tmp_path / "run")
    lock = run_folder.OutputLock(folder).acquire()
    # Another run found this one's lock stale (a machine asleep for hours, a clock jump) and took it over.
    other = dict(pid=os.getpid() + 1, started=1.0, host="another run")
    os.remove(lock.path)
    with open(lock.path, "w", encoding="utf-8") as f:
        json.dump(other, f)
    lock.release()
    assert run_folder.read_lock(lock.path) == other
    # Its own lock it does remove.
    os.remove(lock.path)
    lock = run_folder.OutputLock(folder).acquire()
    lock.release()
    assert not os.path.exists(lock.path)
