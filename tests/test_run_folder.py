"""run_folder.py: what a run writes reaches the disk before it is renamed into place (a power cut leaves the
old file or the new one, never an empty one), for checkpoints, models and metadata alike; and a run that
ends never removes the folder lock another run has taken over since."""

import json
import os

import pytest
import torch

import checkpoints
import models
import run_folder
import speech


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
    checkpoints.atomic_torch_save(dict(weights=torch.arange(50_000.0), epoch=1), path)
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
