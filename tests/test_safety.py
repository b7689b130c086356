"""Issue 10: a night's work is never lost and no file runs code: safe checkpoints, the output-folder
lock, refused overlaps and hostile input, and one clear line for every failure."""

import collections
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import psutil
import pytest
import soundfile as sf
import torch

import checkpoints
import clip_data
import models
import objective
import prepare_data
import run_errors
import run_folder
import spectrogram
import speech
import train_feedback as tf
import train_vits
import vits_trainer
import voice_quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags that keep a CPU run of the tiny model quick (as in test_train_vits.py).
QUICK = ["--device", "cpu", "--batch_size", "2", "--grad_accum", "2", "--disc_channels", "64",
         "--benchmark_samples", "4", "--num_workers", "1", "--warmup_steps", "2", "--d_warmup_steps", "1"]


class Payload:
    """Pickles to a call of os.mkdir: loading it with full pickle would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def trained_voice_dir(tiny_model_dir, tmp_path_factory):
    """A voice folder as train_vits.py leaves it (final_model/ with discriminator.pt)."""
    model, tokenizer = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    out = str(tmp_path_factory.mktemp("voice") / "final_model")
    models.export_voice(model, tokenizer, models.VitsDiscriminator(max_channels=64), out)
    return out


def one_error_line(stderr):
    """The one `error:` line a script printed (progress bars aside), with no traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


def fake_checkpoint(path, step, epoch, batches_done=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(trainer=dict(step=step), epoch=epoch, batches_done=batches_done), path)


# ---------------------------------------------------------------------------------------------------- 1, 4

@pytest.mark.parametrize("how", ["auto", "path"])
def test_a_checkpoint_holding_code_is_refused_and_never_run(prepared_dataset, tiny_model_dir, tmp_path, capsys,
                                                           how):
    out = str(tmp_path / "run")
    marker = str(tmp_path / "code_ran")
    planted = os.path.join(out, "checkpoints", "checkpoint_epoch_9.pt")
    os.makedirs(os.path.dirname(planted))
    torch.save(dict(trainer=dict(step=1), epoch=9, batches_done=0, payload=Payload(marker)), planted)
    code = train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "1",
                    "--resume", "auto" if how == "auto" else planted] + QUICK)
    assert code == 2
    error = one_error_line(capsys.readouterr().err)
    assert "refused" in error and planted in error
    assert not os.path.exists(marker)


def test_checkpoints_are_ordered_by_the_progress_they_record(tmp_path):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoints")
    # (file, step, epoch): the copy reset the dates so that the oldest file looks newest.
    for i, (name, step, epoch) in enumerate([("checkpoint_epoch_5.pt", 50, 5), ("checkpoint_epoch_4.pt", 40, 4),
                                             ("checkpoint_epoch_6_partial.pt", 53, 6),
                                             ("checkpoint_epoch_3.pt", 30, 3)]):
        fake_checkpoint(os.path.join(ckpt, name), step, epoch)
        os.utime(os.path.join(ckpt, name), (1e9 + i, 1e9 + i))
    assert checkpoints.newest_checkpoint(out) == os.path.join(ckpt, "checkpoint_epoch_6_partial.pt")
    checkpoints.prune_checkpoints(out, 2)
    assert sorted(os.listdir(ckpt)) == ["checkpoint_epoch_5.pt", "checkpoint_epoch_6_partial.pt"]


def test_feedback_resume_auto_takes_the_latest_run_by_its_start_time(tmp_path):
    parent = str(tmp_path / "feedback_models")
    for i, run in enumerate(["20261125-090000-2", "20261125-090000", "20261124-230000", "20261125-090000-10"]):
        fake_checkpoint(os.path.join(parent, run, "checkpoints", "checkpoint_epoch_1.pt"), 1, 1)
        os.utime(os.path.join(parent, run, "checkpoints", "checkpoint_epoch_1.pt"), (2e9 - i, 2e9 - i))
    os.makedirs(os.path.join(parent, "20261126-000000"))  # no checkpoint: nothing to resume
    assert tf.newest_run_dir(parent) == os.path.join(parent, "20261125-090000-10")


# ---------------------------------------------------------------------------------------------------- 2, 3, 6

def dead_process():
    """(pid, start time) of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


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
        with pytest.raises(SystemExit, match="in use by another run"):
            prepare_data.main(["--input", kmr_release, "--model", tiny_model_dir, "--output_dir", out])
        assert os.listdir(out) == [run_folder.LOCK_NAME]
    assert os.listdir(out) == []  # released


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


def a_finished_run(folder, script):
    os.makedirs(os.path.join(folder, "checkpoints"))
    fake_checkpoint(os.path.join(folder, "checkpoints", "checkpoint_epoch_5.pt"), 50, 5)
    os.makedirs(os.path.join(folder, "final_model"))
    with open(os.path.join(folder, "run_config.json"), "w") as f:
        json.dump(dict(script=script, args={}), f)
    return tree(folder)


def tree(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, dirs, files in os.walk(folder)
                  for name in dirs + files)


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
    with run_folder.claim_output_dir(args, "train_vits"):
        assert sorted(os.listdir(out)) == [run_folder.LOCK_NAME, "metadata.csv"]
    with pytest.raises(SystemExit):
        train_vits.parse_args(["--output_dir", out, "--overwrite", "--resume", "auto"])


def test_train_feedback_never_writes_into_a_train_vits_run(trained_voice_dir, tmp_path, capsys):
    vits_run = str(tmp_path / "training")
    before = a_finished_run(vits_run, "train_vits")
    for extra in ([], ["--overwrite"], ["--resume", "auto"]):
        assert tf.main(["--model", trained_voice_dir, "--output_dir", vits_run] + extra + QUICK) == 2
        assert "holds a train_vits.py run" in one_error_line(capsys.readouterr().err)
        assert tree(vits_run) == before


# ---------------------------------------------------------------------------------------------------- 5, 7, 12

def test_prepare_data_refuses_an_output_dir_reaching_the_input_through_a_link(prepared_dataset, tiny_model_dir,
                                                                            tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(prepared_dataset, data)
    link = str(tmp_path / "link")
    try:
        os.symlink(data, link, target_is_directory=True)
    except OSError:
        pytest.skip("no permission to make symlinks here")
    before = tree(data)
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["--input", data, "--model", tiny_model_dir, "--output_dir", link, "--max_clips", "1"])
    assert exit_info.value.code == 2
    assert "lies in --output_dir" in capsys.readouterr().err
    assert tree(data) == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="RLIMIT_FSIZE is POSIX")
def test_prepare_data_stops_in_one_line_when_its_outputs_cannot_be_written(kmr_release, tiny_model_dir, tmp_path):
    import resource

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30000, 30000))  # every WAV is larger: as a full disk

    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--input", kmr_release, "--model",
                           tiny_model_dir, "--output_dir", out, "--workers", "1"], cwd=ROOT, capture_output=True,
                          text=True, preexec_fn=small_files_only)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(r"error: cannot write \S+\.wav: File too large$", errors[0]), errors
    assert not os.path.exists(os.path.join(out, "metadata.csv"))
    assert [name for name in os.listdir(os.path.join(out, "wavs")) if name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------- 8, 13, 15

def test_tarball_link_members_are_read_from_their_targets(kmr_release, tiny_model_dir, tmp_path):
    release = str(tmp_path / "kmr")
    shutil.copytree(kmr_release, release)
    header, rows, _ = prepare_data.read_tsv(os.path.join(release, "validated.tsv"))
    first = rows[0]
    # GNU tar stores a repeated file as a hard link to its first copy, here after it in the archive.
    os.link(os.path.join(release, "clips", first["path"]), os.path.join(release, "clips", "zz_hard.mp3"))
    os.symlink(first["path"], os.path.join(release, "clips", "zz_soft.mp3"))
    rows = [dict(first, path="zz_hard.mp3"), dict(first, path="zz_soft.mp3"), dict(first, path="zz_gone.mp3")]
    with open(os.path.join(release, "validated.tsv"), "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n" + "".join("\t".join(r[c] for c in header) + "\n" for r in rows))
    os.symlink("/nowhere/clip.mp3", os.path.join(release, "clips", "zz_gone.mp3"))
    tarball = str(tmp_path / "cv.tar")
    with tarfile.open(tarball, "w") as tar:
        tar.add(release, arcname="cv-corpus-99.0-2026-01-01/kmr")
    kinds = {m.name.rsplit("/", 1)[-1]: m.type for m in tarfile.open(tarball).getmembers()}
    assert kinds["zz_hard.mp3"] == tarfile.LNKTYPE and kinds["zz_soft.mp3"] == tarfile.SYMTYPE

    out = str(tmp_path / "out")
    report = prepare_data.main(["--input", tarball, "--model", tiny_model_dir, "--output_dir", out, "--workers", "1"])
    assert report["kept_clips"] == 2 and report["dropped"] == {"missing_file": 1}
    with open(os.path.join(out, "metadata.csv"), encoding="utf-8") as f:
        assert [line.split("|")[0] for line in f] == ["zz_hard.wav", "zz_soft.wav"]


def test_rows_are_read_alike_by_every_script(prepared_dataset, tiny_model_dir, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(prepared_dataset, data)
    with open(os.path.join(data, "metadata.csv"), encoding="utf-8") as f:
        (a, text_a), (b, text_b) = [line.rstrip("\n").split("|") for line in f][:2]
    outside = str(tmp_path / "outside.wav")
    shutil.copy(os.path.join(data, "wavs", b), outside)
    lines = [f"{a}|{text_a}", f"{a}|{text_b}",  # a duplicate: the first row wins
             f"{b}|raw text|{text_b}",  # name|raw|normalised
             f"{b[:-4]}x.wav|four|fields|here",  # malformed
             f"../{os.path.basename(outside)}|{text_b}", f"{outside}|{text_b}"]  # paths leaving wavs/
    with open(os.path.join(data, "metadata.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    left_out = collections.Counter()
    assert speech.read_metadata(os.path.join(data, "metadata.csv"), left_out) == [(a, text_a), (b, text_b)]
    assert left_out == {"duplicate": 1, "malformed_row": 1, "bad_path": 2}

    out = str(tmp_path / "out")
    shutil.copy(outside, os.path.join(data, "outside.wav"))  # within reach of ../ from wavs/
    report = prepare_data.main(["--input", data, "--model", tiny_model_dir, "--output_dir", out, "--workers", "1"])
    assert report["kept_clips"] == 2
    assert report["dropped"] == {"duplicate": 1, "malformed_row": 1, "bad_path": 2}
    with open(os.path.join(out, "metadata.csv"), encoding="utf-8") as f:
        assert f.read() == f"{a}|{text_a}\n{b}|{text_b}\n"


def test_metadata_that_is_not_utf8_is_one_line(prepared_dataset, tiny_model_dir, tmp_path, capsys):
    data = str(tmp_path / "data")
    os.makedirs(os.path.join(data, "wavs"))
    with open(os.path.join(data, "metadata.csv"), "wb") as f:
        f.write("a.wav|Ez bi kurdî diaxivim.\n".encode("cp1254"))
    assert train_vits.main(["--model", tiny_model_dir, "--data_dir", data, "--output_dir", str(tmp_path / "run")]
                   + QUICK) == 2
    assert "not UTF-8" in one_error_line(capsys.readouterr().err)
    assert tf.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--feedback_dir", data,
                    "--output_dir", str(tmp_path / "feedback_run")] + QUICK) == 2
    assert "not UTF-8" in one_error_line(capsys.readouterr().err)


def test_a_damaged_preload_cache_is_rebuilt(prepared_dataset, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    first, _ = clip_data.load_clips(prepared_dataset, 16000, cache, 1)
    [path] = glob.glob(os.path.join(cache, "preload_*.npz"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    again, _ = clip_data.load_clips(prepared_dataset, 16000, cache, 1)
    assert "rebuilding" in capsys.readouterr().out
    assert [c[0] for c in again] == [c[0] for c in first]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(first, again))
    clip_data.load_clips(prepared_dataset, 16000, cache, 1)
    assert "from cache" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- 9, 16

def test_pool_workers_end_with_a_killed_parent():
    # The parent starts a pool as the scripts do, reports its worker, then kills itself.
    script = ("import os, signal\n"
              "from concurrent.futures import ProcessPoolExecutor\n"
              "import run_folder\n"
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


def test_sigterm_keeps_what_prepare_data_decoded(kmr_release, tiny_model_dir, tmp_path, monkeypatch):
    decode = prepare_data.decode_clip
    calls = []

    def decode_then_sigterm(job):
        calls.append(job)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a shutdown or `kill` would, mid-run
        return decode(job)

    monkeypatch.setattr(prepare_data, "decode_clip", decode_then_sigterm)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="interrupted"):
        prepare_data.main(["--input", kmr_release, "--model", tiny_model_dir, "--output_dir", out, "--workers", "1"])
    with open(os.path.join(out, prepare_data.CACHE_NAME), encoding="utf-8") as f:
        assert len(json.load(f)["clips"]) >= 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert not os.path.exists(os.path.join(out, run_folder.LOCK_NAME))


def test_ctrl_c_before_training_is_one_line(prepared_dataset, tiny_model_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(clip_data, "decode_all", interrupted)
    assert train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir",
                    str(tmp_path / "run")] + QUICK) == 130
    assert "interrupted" in one_error_line(capsys.readouterr().err)


def test_a_damaged_model_file_is_one_line(tiny_model_dir, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, model)
    [weights] = [n for n in os.listdir(model) if n.endswith((".safetensors", ".bin"))]
    with open(os.path.join(model, weights), "wb") as f:
        f.write(b"\x80\x04not a model")
    with pytest.raises(run_errors.TrainingError, match=f"--model {re.escape(model)}: cannot load"):
        models.load_voice(model)


def test_exported_models_have_ordinary_permissions(trained_voice_dir):
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(trained_voice_dir).st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------------------------------------------- 10, 11, 14

def quick_trainer(model_dir, **flags):
    model, tokenizer = models.load_voice(model_dir)
    models.prepare_for_training(model)
    args = train_vits.parse_args([f"--{k}={v}" for k, v in flags.items()])
    return vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"), "fp32"), tokenizer


def test_listening_samples_of_a_diverged_model_are_capped(tiny_model_dir, tmp_path):
    trainer, tokenizer = quick_trainer(tiny_model_dir)
    # Durations e^6 = 400 frames a token: a 13 s sentence, as a diverging model predicts far longer ones.
    trainer.model.duration_predictor.register_forward_hook(lambda module, inputs, out: out + 6.0)
    [path] = voice_quality.synthesise(trainer.model, tokenizer, ["Roj baş."], str(tmp_path), max_seconds=1.0)
    audio, sr = sf.read(path)
    tokens = len(tokenizer("Roj baş.").input_ids)
    assert 0 < len(audio) <= sr + tokens * spectrogram.HOP  # ceil() adds at most a frame per token


def test_a_step_that_raises_a_numeric_error_is_a_skipped_step(tiny_model_dir, monkeypatch, capsys):
    trainer, _ = quick_trainer(tiny_model_dir, max_bad_steps=2)

    def spline_fails(*args, **kwargs):
        raise RuntimeError("Input to the spline is outside its domain")

    monkeypatch.setattr(objective, "generator_forward", spline_fails)
    batch = dict(audio=torch.zeros(1, 8192))
    assert trainer.train_window([batch]) is None
    assert trainer.skipped_steps == 1 and trainer.step == 0
    assert all(p.requires_grad for p in trainer.disc.parameters())
    with pytest.raises(run_errors.TrainingError, match="2 non-finite training steps in a row"):
        trainer.train_window([batch])
    assert "RuntimeError: Input to the spline" in capsys.readouterr().out


def test_resume_refuses_flags_that_change_the_run():
    saved = vars(train_vits.parse_args(["--lr", "2e-5", "--batch_size", "8"]))
    checkpoints.check_resumed_flags(saved, train_vits.parse_args(["--lr", "2e-5", "--batch_size", "8", "--epochs", "9"]),
                           "c.pt")  # free to change
    for flags, named in ((["--lr", "1e-4"], "--lr 0.0001 (the run has 2e-05)"),
                         (["--batch_size", "4"], "--batch_size 4 (the run has 8)"),
                         (["--grad_accum", "2"], "--grad_accum 2 (the run has 4)")):
        with pytest.raises(run_errors.TrainingError, match=re.escape(named)):
            checkpoints.check_resumed_flags(saved, train_vits.parse_args(flags), "c.pt")


def test_the_data_check_sees_a_wav_replaced_under_its_name(tiny_model_dir):
    _, tokenizer = models.load_voice(tiny_model_dir)
    pcm = np.arange(16000, dtype=np.int16)
    mel = np.zeros((80, 62), np.float16)
    before = clip_data.ClipSet([("a.wav", "roj baş", pcm, mel)], tokenizer)
    replaced = clip_data.ClipSet([("a.wav", "roj baş", pcm[::-1].copy(), mel)], tokenizer)
    retexted = clip_data.ClipSet([("a.wav", "roj xweş", pcm, mel)], tokenizer)
    keys = {checkpoints.data_fingerprint([cs], {}) for cs in (before, replaced, retexted)}
    assert len(keys) == 3
    assert checkpoints.data_fingerprint([before], {}) == checkpoints.data_fingerprint([before.subset([0])], {})


@pytest.mark.parametrize("flags", [["--lr", "0"], ["--lr", "nan"], ["--seed", "-1"], ["--device", "foo"],
                                   ["--target_hours", "nan"], ["--target_hours", "inf"], ["--val_size", "-1"],
                                   ["--grad_clip", "-1"], ["--epochs", "-1"], ["--max_steps", "-3"],
                                   ["--sample_sentences", "no_such_file.txt"]])
def test_bad_flags_are_one_line(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_vits.parse_args(flags)
    assert exit_info.value.code == 2
    assert flags[0] in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags", [["--feedback_weight", "nan"], ["--feedback_weight", "inf"],
                                   ["--target_minutes", "nan"]])
def test_bad_feedback_flags_are_one_line(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tf.parse_args(flags + ["--output_dir", "unused"])
    assert exit_info.value.code == 2
    assert flags[0] in one_error_line(capsys.readouterr().err)


def test_segment_frames_longer_than_every_clip_is_refused(prepared_dataset, tiny_model_dir, tmp_path, capsys):
    assert train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", str(tmp_path / "run"),
                    "--epochs", "1"] + QUICK + ["--segment_frames", "100000"]) == 2
    assert "--segment_frames 100000 is longer than the longest" in one_error_line(capsys.readouterr().err)
