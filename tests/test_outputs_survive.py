"""Never lose what was saved: a full disk while saving the final or best model is one clear line and keeps
the model saved before; a swap cut short between its renames loses nothing; a checkpoint or metadata.csv
write that fails half-way leaves the previous file intact."""

import errno
import os
import shutil

import pytest
import safetensors
import safetensors.torch
import torch
from transformers import VitsModel

from voicetune.common import run_errors
from voicetune.common import speech
from voicetune.night import checkpoints
from voicetune.voice import models
from conftest import make_disk_full


FULL_DISK_POINTS = ["config.json", "weights", "weights_oserror", "vocab.json", "tokenizer_config.json",
                    "discriminator.pt", "fsync", "rename_old_aside", "rename_new_in"]


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


def run_with_saved_model(saved_voice, tmp_path, where):
    """An output folder holding the model saved before, at `where` (final_model or checkpoints/best_model)."""
    out = str(tmp_path / "run" / where)
    shutil.copytree(saved_voice, out)
    return out


def contents(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def in_temp_folder(path):
    """A file export_voice writes into its hidden temp folder (`.final_model.<pid>.tmp/...`)."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))).endswith(f".{os.getpid()}.tmp")


ENOSPC = "No space left on device"


def fill_the_disk(monkeypatch, how):
    """Make the disk fill at one point of export_voice (what each writer really raises on a full disk,
    seen on a small tmpfs: SafetensorError "(os error 28)", an OSError from write(), torch.save's
    RuntimeError "unexpected pos", which atomic_torch_save turns back into that OSError)."""
    if how in ("config.json", "vocab.json", "tokenizer_config.json", "discriminator.pt"):
        make_disk_full(monkeypatch, lambda path: in_temp_folder(path) and (
            os.path.basename(path) == how or os.path.basename(path).startswith(f".{how}.")), room=100)
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


def full_disk_in(monkeypatch, folder, limit):
    """Files opened for writing in `folder` take `limit` bytes, then raise ENOSPC (as a full disk)."""
    make_disk_full(monkeypatch, lambda path: os.path.realpath(os.path.dirname(os.path.abspath(path))) ==
                   os.path.realpath(folder), limit)


def test_a_write_that_fails_half_way_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = str(folder / "checkpoint_epoch_1.pt")
    g = torch.Generator().manual_seed(0)
    first = dict(weights=torch.randn(64, 1024, generator=g), step=1, epoch=1)
    second = dict(weights=torch.randn(64, 1024, generator=g), step=2, epoch=2)
    models.atomic_torch_save(first, path)
    with monkeypatch.context() as m:
        full_disk_in(m, str(folder), 100_000)  # about a third of the new file
        with pytest.raises(OSError) as err:
            models.atomic_torch_save(second, path)
    assert err.value.errno == errno.ENOSPC
    loaded = checkpoints.read_checkpoint(path)
    assert loaded["step"] == 1 and loaded["epoch"] == 1 and torch.equal(loaded["weights"], first["weights"])
    assert os.listdir(folder) == ["checkpoint_epoch_1.pt"]  # no temp file left

    data = tmp_path / "data"
    data.mkdir()
    metadata = str(data / "metadata.csv")
    rows = [(f"clip_{i}.wav", f"Ez bi kurdî diaxivim {i}.") for i in range(50)]
    speech.write_metadata(metadata, rows)
    with open(metadata, "rb") as f:
        old = f.read()
    assert old == "".join(f"{n}|{t}\n" for n, t in rows).encode("utf-8")
    with monkeypatch.context() as m:
        full_disk_in(m, str(data), len(old) // 2)
        with pytest.raises(OSError) as err:
            speech.write_metadata(metadata, [(f"new_{i}.wav", "Roj baş, tu çawa yî?") for i in range(80)])
    assert err.value.errno == errno.ENOSPC
    with open(metadata, "rb") as f:
        assert f.read() == old
    assert speech.read_metadata(metadata) == rows
    assert os.listdir(data) == ["metadata.csv"]
