"""The output folder of a run: a lock so that two runs never write into one folder, and temporary files
named by the process that writes them, so cleaning up never removes a live process's file; and worker
processes that end with the run that started them.

Used by prepare_data.py, train_vits.py and train_feedback.py, and by run_files.py, which claims a run's
output folder with this lock and writes a run's files with these writers. It behaves the same on Windows and
Linux: the lock is a file created exclusively (os.O_EXCL) that names its owner (PID, process start time, host);
a lock whose process has ended (killed, crashed, machine rebooted) is stale and taken over.
"""

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import threading
import time

import psutil

from voicetune.common import run_errors

LOCK_NAME = ".run.lock"
# An empty or unreadable lock younger than this may be one another process is writing right now.
UNREADABLE_LOCK_GRACE_S = 60.0
TEMP_PATTERN = re.compile(r"\..+\.(\d+)\.tmp")


class FolderInUse(run_errors.TrainingError):
    """Another live run holds the folder's lock; the message says which and what to do (one line, as every
    TrainingError ends a command)."""


def process_running(pid, started=None):
    """True while process `pid` runs (and, given `started`, is the one that started then: PIDs are reused)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # another user's process: it exists


def exit_with_parent(parent_pid, parent_started=None, poll_s=1.0):
    """Pool worker initializer: end this worker when the process that started it has ended.

    A killed parent (SIGKILL, a closed console, Task Manager) cannot shut its pool down; without this its
    workers, each holding decoded audio, would live on and eat the RAM the next run's preload checks.
    Polling works alike on Windows and Linux, where no signal reaches the orphans.
    """
    def watch():
        while process_running(parent_pid, parent_started):
            time.sleep(poll_s)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def worker_setup():
    """initializer/initargs for a ProcessPoolExecutor whose workers must not outlive this process."""
    me = psutil.Process()
    return dict(initializer=exit_with_parent, initargs=(me.pid, me.create_time()))


def this_process():
    me = psutil.Process()
    return dict(pid=me.pid, started=me.create_time(), host=socket.gethostname())


class OutputLock:
    """`with OutputLock(folder):` holds `folder` for this process, or raises FolderInUse."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.owner = this_process()
        self.held = False

    def __enter__(self):
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        os.makedirs(self.folder, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self.take_over_if_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.owner, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self

    def take_over_if_stale(self):
        """Remove the lock if its owner has ended; raise FolderInUse for a live (or unknowable) one."""
        self.remove_if_stale(self.path)

    def remove_if_stale(self, path):
        """Remove the lock file `path` (the folder's lock, or a claim on a lock) if the process that wrote it
        has ended; raise FolderInUse while it lives (or cannot be known); return once the file is gone.

        Reading a lock and then removing it are two steps: a process that found the lock stale and then
        removed whatever lies at `path` could remove the fresh lock of another process that took the same
        stale lock over first, and both would believe they hold the folder. So a stale lock is removed only
        under a claim: a file created exclusively (os.O_EXCL) whose name is derived from that very lock (its
        owner's PID and start time), which exactly one process can create. The claimant reads `path` again
        and removes it only if it is still that lock; nobody else removes a claimed lock, so it cannot change
        between that read and the removal. Plain files only, alike on Windows and Linux (no fcntl, msvcrt or
        /proc). A claim lives for microseconds; one left by a process killed while holding it is stale and
        is removed the same way, under a claim on the claim.
        """
        holder, identity, mtime = lock_identity(path)
        if identity is None:
            return  # gone: the next try creates the lock (or finds the lock of whoever was first)
        if holder is None:
            if time.time() - mtime < UNREADABLE_LOCK_GRACE_S:
                raise FolderInUse(f"{self.folder} is being claimed by another run right now "
                                  f"(lock file {path}); try again in a minute")
        elif holder.get("host") != self.owner["host"]:
            raise FolderInUse(f"{self.folder} is in use by a run on another machine ({holder.get('host')}, "
                              f"PID {holder.get('pid')}); if that run has ended, delete {path}")
        elif process_running(holder["pid"], holder.get("started")):
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("started", 0)))
            raise FolderInUse(f"{self.folder} is in use by another run (PID {holder['pid']}, started {since}): "
                              "wait for it to end, or choose another folder")
        claim = f"{path}.{identity}.claim"
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            self.remove_if_stale(claim)  # FolderInUse while its claimant is at work; removed if it has died
            return
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.owner, f)
            if lock_identity(path)[1] == identity:  # not yet removed (and replaced) by an earlier claimant
                remove_lock_file(path)
        finally:
            remove_lock_file(claim)

    def release(self):
        if self.held and read_lock(self.path) == self.owner:
            remove_lock_file(self.path)
        self.held = False


def read_json(path):
    """The JSON object in `path`, or None when it is missing or not (yet) readable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_lock(path):
    holder = read_json(path)
    return holder if holder is not None and isinstance(holder.get("pid"), int) else None


def lock_identity(path):
    """(owner or None when unreadable, a name for this very lock file, its mtime); identity None: no file.

    A readable lock is named by its owner's PID and start time, which no later lock repeats; an unreadable
    one (its writer killed before it wrote) by its modification time and size."""
    holder = read_lock(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None, None, None
    if holder is None:
        return None, f"x{stat.st_mtime_ns}-{stat.st_size}", stat.st_mtime
    return holder, f"{holder['pid']}-{holder.get('started')}", stat.st_mtime


def remove_lock_file(path):
    """Remove `path` if it is there. Windows refuses to delete a file another process has open, as one
    reading this lock right now does for a moment: retry then, briefly."""
    for attempt in range(100):
        try:
            os.remove(path)
            return
        except FileNotFoundError:
            return
        except PermissionError:
            if os.name != "nt" or attempt == 99:
                raise
            time.sleep(0.01)


def within(path, folder):
    """True when `path` is `folder` or lies inside it (both resolved, links followed)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def overlap(a, b):
    """True when one of two folders is, or holds, the other: the rule for every "must not overlap"."""
    return within(a, b) or within(b, a)


def temp_name(path):
    """Where `path` is written before it is renamed into place: hidden, and named by the writing process."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def written_atomically(path, durable=True):
    """A binary file that replaces `path` only once all of it is written; on any error the temp file is
    removed, so a full disk never leaves half a file. durable: on disk (fsync) before the rename, for files
    a crash must not take (checkpoints, caches); off for the many small WAVs of a data set."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomically(path, data, durable=True):
    """Replace `path` by `data` (bytes, or str written as UTF-8) as written_atomically does."""
    with written_atomically(path, durable) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def open_modes(folder):
    """Give every file directly in `folder` the mode open() gives a new file (0o666 less the umask).

    safetensors writes model.safetensors readable by its owner alone (0600): a server running as another
    user could then not load the voice. Windows has no such modes (a file is read-only or not)."""
    if os.name == "nt":
        return
    umask = os.umask(0o077)  # only read: the narrowest umask for the instant it takes to put it back
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            try:
                os.chmod(path, 0o666 & ~umask)
            except OSError:
                pass  # a file system without modes (FAT, some network shares) keeps its own: the file is whole


def sync_files(folder):
    """Flush every file directly in `folder` to disk (before a rename makes the folder the real one)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDWR)  # Windows: fsync needs a handle open for writing
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def remove_stale_temps(folder):
    """Delete temp files and folders (temp_name) in `folder` whose writing process has ended."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        match = TEMP_PATTERN.fullmatch(name)
        if match and (int(match.group(1)) == os.getpid() or not process_running(int(match.group(1)))):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def new_run_dir(parent, stamp_format="%Y%m%d-%H%M%S"):
    """A new folder name under `parent` stamped with the start time (-2, -3... when two start at once)."""
    base = os.path.join(parent, time.strftime(stamp_format))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def newest_run_dir(parent):
    """The latest run with a checkpoint, by the start time new_run_dir put in its name (file dates change
    when folders are copied)."""
    def started(run):
        match = re.fullmatch(r"(\d{8}-\d{6})(?:-(\d+))?", os.path.basename(run))
        return (match.group(1), int(match.group(2) or 1)) if match else ("", 0)
    runs = [d for d in glob.glob(os.path.join(parent, "*"))
            if glob.glob(os.path.join(d, "checkpoints", "checkpoint_epoch_*.pt"))]
    return max(runs, key=started) if runs else None


@contextlib.contextmanager
def removed_if_left_empty(folder):
    """Run the block; then remove `folder`, and each parent of it that was not there before either, if the
    block left them empty: a command refused before it wrote anything leaves no folder behind."""
    made, path = [], os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        made.append(path)
        path = os.path.dirname(path)
    try:
        yield
    finally:
        for path in made:  # the deepest first; one that holds anything keeps its parents
            try:
                os.rmdir(path)
            except OSError:
                break
