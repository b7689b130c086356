"""The run folder's contract (run_files.py): the commands that only read a run load no torch, a voice's
fingerprint is the sha256 of its files, one rule says which voice is current, report.json is never seen half
written, the names and command lines every writer and reader share, and the one way texts are spoken into
named WAVs."""

import contextlib
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import soundfile as sf

from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.voice import speak_lines
from voicetune.voice import voices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_free(code):
    """Run `code` in a fresh interpreter at the repository root; fail naming the import if torch was loaded."""
    check = code + "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.parametrize("module", ["voicetune.common.run_files", "voicetune.feedback.verdict",
                                    "voicetune.voice.voices", "voicetune.voice.speak_lines"])
def test_what_only_reads_a_run_imports_no_torch(module):
    torch_free(f"import {module}")


def test_speak_with_an_onnx_voice_and_a_promote_refusal_load_no_torch(tiny_model_dir, tmp_path):
    """speak.py --onnx run as a command (a file of lines, lines.csv), and a promote that reads a run and refuses."""
    from voicetune.voice import onnx_voice

    onnx_voice.export_folder(tiny_model_dir, str(tmp_path / "onnx"))
    lines = tmp_path / "lines.txt"
    lines.write_text("Roj baş.\nEz 25 salî me.\n", encoding="utf-8")
    torch_free("import runpy, sys\n"
               f"sys.argv = ['speak.py', '--onnx', {str(tmp_path / 'onnx')!r}, '--file', {str(lines)!r}, "
               f"'--out_dir', {str(tmp_path / 'out')!r}]\n"
               "try:\n    runpy.run_path('speak.py', run_name='__main__')\n"
               "except SystemExit as end:\n    assert end.code == 0, end.code\n")
    assert sorted(os.listdir(tmp_path / "out")) == ["line_001.wav", "line_002.wav", "lines.csv"]
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    run_files.write_report(str(run), dict(status="training"))
    make_voice(str(tmp_path / "data" / "voice"))
    done = torch_free("from voicetune.voice import voices\nfrom voicetune.common import run_errors\n"
                      f"print(voices.current_voice({str(tmp_path / 'data')!r}).name)\n"
                      f"try:\n    voices.promote({str(run)!r}, {str(tmp_path / 'data')!r})\n"
                      "except run_errors.TrainingError as err:\n    print(err)\n")
    assert done.stdout.startswith("voice\n") and "not a finished feedback run" in done.stdout


# ----------------------------------------------------------------------------------------------------
# A voice folder: whole or not, its fingerprint, and which voice is current.

def make_voice(folder, weights=b""):
    """The files of a voice folder, its weights a valid safetensors file (a torch-free stand-in for a model)."""
    os.makedirs(folder, exist_ok=True)
    for name in ("config.json", "vocab.json", "tokenizer_config.json"):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(dict(name=name, weights=weights.hex()), f)
    safetensors.numpy.save_file({"w": np.frombuffer(weights + b"\0" * 4, dtype=np.uint8)},
                                os.path.join(folder, "model.safetensors"))
    return folder


def test_a_fingerprint_is_the_sha256_of_every_file(tmp_path):
    voice = make_voice(str(tmp_path / "voice"))
    os.makedirs(tmp_path / "voice" / "sub")
    (tmp_path / "voice" / "sub" / "speakers.json").write_bytes(b"[1, 2]")
    expected = {}
    for root, _, files in os.walk(voice):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                expected[os.path.relpath(os.path.join(root, name), voice).replace(os.sep, "/")] = \
                    hashlib.sha256(f.read()).hexdigest()
    assert run_files.voice_fingerprint(voice) == expected and "sub/speakers.json" in expected
    assert run_files.model_fingerprint(voice) == expected["model.safetensors"]
    assert run_files.model_fingerprint(str(tmp_path / "a-hub-name")) is None
    (tmp_path / "voice" / "vocab.json").write_bytes(b"{}")
    assert run_files.voice_fingerprint(voice)["vocab.json"] == hashlib.sha256(b"{}").hexdigest()


def test_the_current_voice_is_a_whole_promoted_voice_else_the_nights(tmp_path, capsys):
    data = tmp_path / "training"
    make_voice(str(data / "final_model"))
    assert run_files.current_voice(data) == data / "final_model"  # no voice/
    make_voice(str(data / "voice"), b"tuned")
    assert run_files.current_voice(data) == data / "voice"  # a whole voice/
    assert voices.current_voice(data) == data / "voice"  # the same rule after mending
    weights = data / "voice" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])  # cut short by a full disk
    capsys.readouterr()
    assert run_files.current_voice(data) == data / "final_model"  # half a voice/ is not used
    assert "model.safetensors came out incomplete" in capsys.readouterr().out
    assert voices.current_voice(data) == data / "final_model"
    os.remove(data / "voice" / "vocab.json")
    assert run_files.voice_missing(str(data / "voice")) == "vocab.json was not written"
    assert run_files.current_voice(data) == data / "final_model"


def test_a_promote_never_keeps_half_a_voice_as_version_1(tmp_path):
    data = tmp_path / "training"
    make_voice(str(data / "final_model"))
    empty = dict(current=None, versions=[], events=[])
    night = voices.voice_in_use(data, empty)
    assert night["folder"] == str(data / "final_model") and night["version"] == 1
    assert night["model_sha256"] == run_files.model_fingerprint(str(data / "final_model"))
    make_voice(str(data / "voice"), b"by hand")
    assert voices.voice_in_use(data, empty)["folder"] == str(data / "voice")
    os.remove(data / "voice" / "config.json")
    with pytest.raises(run_errors.TrainingError, match="put there by hand, is not a whole voice"):
        voices.voice_in_use(data, empty)


# ----------------------------------------------------------------------------------------------------
# The files: written whole or not at all.

def test_report_json_is_written_to_a_temp_name_then_renamed(tmp_path, monkeypatch):
    run = str(tmp_path)
    path = os.path.join(run, run_files.REPORT)
    renames, real_replace = [], os.replace

    def replace(src, dst):
        with open(src, encoding="utf-8") as f:
            renames.append((src, dst, json.load(f)))  # whole before it takes the name
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    run_files.write_report(run, dict(status="done", model="ç"))
    assert renames == [(run_folder.temp_name(path), path, dict(status="done", model="ç"))]
    assert run_files.read_report(run) == dict(status="done", model="ç")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        run_files.write_report(run, dict(status="training"))
    assert run_files.read_report(run) == dict(status="done", model="ç")  # the earlier report stands
    assert os.listdir(run) == [run_files.REPORT]  # and no temp file is left


def test_metrics_records_are_read_back_by_epoch(tmp_path):
    run = str(tmp_path)
    run_files.append_metrics(run, dict(step=1, epoch=1, lr=1e-4, loss=2.0))  # a training line
    run_files.append_metrics(run, dict(step=2, epoch=1, val_mel=1.5))
    run_files.append_metrics(run, dict(step=3, epoch=1, val_mel=1.4, feedback_mel=1.1))
    run_files.append_metrics(run, dict(step=4, epoch=2, lr=1e-4, loss=1.9))
    with open(os.path.join(run, run_files.METRICS), "a", encoding="utf-8") as f:
        f.write('{"step": 5, "epoch": 2, "val_m')  # cut by a full disk
    records = run_files.validation_records(run)
    assert records == {1: dict(step=3, epoch=1, val_mel=1.4, feedback_mel=1.1)}
    assert run_files.validated_sets(records) == ["val", "feedback"]
    assert run_files.validation_records(str(tmp_path / "none")) == {}


def test_which_script_a_run_belongs_to(tmp_path):
    assert run_files.run_script(str(tmp_path)) is None
    run_files.write_run_config(str(tmp_path), dict(script="train_vits", args={}))
    assert run_files.run_script(str(tmp_path)) == "train_vits"
    run_files.write_run_config(str(tmp_path), dict(args=dict(feedback_dir="f")))  # before `script` was recorded
    assert run_files.run_script(str(tmp_path)) == "train_feedback"


# ----------------------------------------------------------------------------------------------------
# The names and the command lines.

def test_sample_and_metric_names():
    assert run_files.sample_name(os.path.join("take 2", "a.b.flac")) == "take 2_a.b.wav"
    assert run_files.sample_name("s001.wav") == "s001.wav"
    assert [run_files.sentence_sample(i) for i in (0, 7, 12)] == ["00.wav", "07.wav", "12.wav"]
    assert [run_files.sentence_index(n) for n in ("07.wav", "12.wav", "s001.wav", "07.flac")] == [7, 12, None, None]
    assert run_files.epoch_samples(3) == "epoch_3" and run_files.epoch_of("epoch_3") == 3
    assert run_files.epoch_of("epoch_x") is None and run_files.speaker_samples(2) == "speaker_2"
    assert [run_files.metric_key(s, m) for s, m in (("val", "mel"), ("val", "mcd"), ("feedback", "dnsmos_ovrl"))] == \
        ["val_mel", "eval_mcd", "feedback_eval_dnsmos_ovrl"]


def test_the_next_command_lines(monkeypatch):
    monkeypatch.setattr(run_files, "interpreter", lambda: "python")  # (the interpreter: the test below)
    monkeypatch.chdir(run_files.REPOSITORY)
    assert run_files.promote_command("runs/a b") == 'python train_feedback.py --promote "runs/a b"'
    assert run_files.promote_command("r", "my data") == 'python train_feedback.py --promote r --data_dir "my data"'
    assert run_files.compare_command("r") == "python train_feedback.py --compare r"
    assert run_files.listen_command("sentences.txt", "r/final_model") == \
        "python train_feedback.py --listen sentences.txt --model r/final_model"
    assert run_files.listen_command("sessions/1") == "python train_feedback.py --listen sessions/1"
    assert run_files.tune_command("v w", feedback_dir="fb", speaker_id=0) == \
        'python train_feedback.py --model "v w" --feedback_dir fb --speaker_id 0'
    assert run_files.tune_command("v") == "python train_feedback.py --model v"
    assert run_files.resume_command("train_vits", "m", "out", "training") == \
        "python train_vits.py --model m --data_dir training --output_dir out --resume auto"
    assert run_files.resume_command("train_feedback", "m", "out") == \
        "python train_feedback.py --model m --output_dir out --resume auto"


# ----------------------------------------------------------------------------------------------------
# The one way texts are spoken into named WAVs.

class CountingVoice:
    """A voice that says a sentence as one sample value per letter, and records the seeds it was given."""
    sampling_rate = 8000

    def __init__(self):
        self.seeds = []

    def seeded(self, seed):
        self.seeds.append(seed)
        return contextlib.nullcontext()

    def say(self, sentence):
        return np.full(100 * len(sentence), 0.25, dtype=np.float32)


def test_texts_are_spoken_into_their_named_wavs_in_one_seeded_pass(tmp_path):
    voice = CountingVoice()
    named = [("s001.wav", "ab"), ("line_002.wav", ["a", "abc"])]  # a sentence, and a line of two
    paths = speak_lines.speak_files(voice, named, str(tmp_path / "out"), seed=7, pause=0.5)
    assert paths == [str(tmp_path / "out" / "s001.wav"), str(tmp_path / "out" / "line_002.wav")]
    assert voice.seeds == [7]  # one seed, then the texts in order
    one, sr = sf.read(paths[0], dtype="float32")
    assert sr == 8000 and len(one) == 200 and np.allclose(one, 0.25)
    two, _ = sf.read(paths[1], dtype="float32")
    np.testing.assert_allclose(two, np.concatenate([np.full(100, 0.25), np.zeros(4000), np.full(300, 0.25)]))
    assert sf.info(paths[1]).subtype == "PCM_16"
    assert sorted(os.listdir(tmp_path / "out")) == ["line_002.wav", "s001.wav"]  # no temp file left


def test_the_hints_name_the_python_that_ran_as_the_user_types_it(monkeypatch, tmp_path):
    venv = tmp_path / "my work" / ".venv" / "bin"
    venv.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "my work")
    monkeypatch.setenv("PATH", "")
    # A virtual environment under the current folder, run without activating it: as typed, relative.
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    assert run_files.interpreter() == os.path.join(".venv", "bin", "python")
    script = os.path.join(run_files.REPOSITORY, "train_feedback.py")
    assert run_files.rollback_command("home") == f"{os.path.join('.venv', 'bin', 'python')} {script} --rollback " \
                                                 "--data_dir home"
    # A Python elsewhere: `python` when it is the one the PATH finds first, else its full path (quoted).
    elsewhere = tmp_path / "py thon" / "bin"
    elsewhere.mkdir(parents=True)
    (elsewhere / "python").write_text("")
    (elsewhere / "python").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(elsewhere / "python"))
    assert run_files.interpreter() == str(elsewhere / "python")
    assert run_files.compare_command("r").startswith(f'"{elsewhere / "python"}" {script} --compare r')
    monkeypatch.setenv("PATH", str(elsewhere))
    assert run_files.interpreter() == "python"
    # From the repository root, the command is its own name.
    monkeypatch.chdir(run_files.REPOSITORY)
    assert run_files.compare_command("r") == "python train_feedback.py --compare r"


def test_the_hints_name_the_training_folder_unless_the_command_finds_it_by_itself(monkeypatch, tmp_path):
    monkeypatch.setattr(run_files, "interpreter", lambda: "python")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_feedback.py").write_text("")  # (the command as the repository's root reaches it)
    monkeypatch.setattr(run_files, "REPOSITORY", str(tmp_path))
    night = tmp_path / "example_run"
    (night / "final_model").mkdir(parents=True)
    run_files.write_run_config(str(night), dict(script="train_vits", args=dict(data_dir="example_run")))
    voice = os.path.join("example_run", "final_model")
    # Another folder than the default is always named; the default only where the voice's record names another.
    assert run_files.tune_command(voice, "example_run") == \
        f"python train_feedback.py --model {voice} --data_dir example_run"
    assert run_files.tune_command(voice, "training") == f"python train_feedback.py --model {voice} --data_dir training"
    assert run_files.tune_command("hub/mms", "training") == "python train_feedback.py --model hub/mms"
    # The feedback folder only where it is not the training folder's own.
    assert run_files.tune_command(voice, "example_run", os.path.join("example_run", "feedback")) == \
        f"python train_feedback.py --model {voice} --data_dir example_run"
    assert run_files.listen_command("s.txt", voice, "example_run", "fb") == \
        f"python train_feedback.py --listen s.txt --model {voice} --data_dir example_run --feedback_dir fb"
    assert run_files.promote_command("example_run", "example_run") == \
        "python train_feedback.py --promote example_run --data_dir example_run"
    assert run_files.rollback_command("training") == "python train_feedback.py --rollback"
    assert run_files.sentences_file() == run_files.SENTENCES


def test_a_voice_names_the_training_folder_it_belongs_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    night = tmp_path / "example_run"
    (night / "final_model").mkdir(parents=True)
    (night / "checkpoints" / "best_model").mkdir(parents=True)
    run_files.write_run_config(str(night), dict(args=dict(data_dir="example_run")))
    tune = tmp_path / "example_run" / "feedback_models" / "20261207-070000"
    (tune / "final_model").mkdir(parents=True)
    run_files.write_run_config(str(tune), dict(args=dict(data_dir="example_run")))
    for voice in ("example_run/final_model", "example_run/checkpoints/best_model",
                  str(tune / "final_model")):
        assert run_files.night_data_dir(voice) == "example_run", voice
    (tmp_path / "home" / "voice").mkdir(parents=True)
    (tmp_path / "home" / "voices" / "003").mkdir(parents=True)
    assert run_files.night_data_dir("home/voice") == str(tmp_path / "home")
    assert run_files.night_data_dir("home/voices/003") == str(tmp_path / "home")
    (tmp_path / "loose").mkdir()
    assert run_files.night_data_dir("loose") is None  # no record: the default folder is the caller's to choose
    assert run_files.night_data_dir("facebook/voice") is None  # a Hub voice, not a folder here


def test_a_tune_finds_the_nights_training_set_and_its_folders_from_the_voice(tmp_path, monkeypatch):
    import train_feedback

    monkeypatch.chdir(tmp_path)
    night = tmp_path / "example_run"
    (night / "final_model").mkdir(parents=True)
    (night / "metadata.csv").write_text("a.wav|roj baş\n", encoding="utf-8")
    run_files.write_run_config(str(night), dict(args=dict(data_dir="example_run")))
    args = train_feedback.parse_args(["--model", "example_run/final_model"])
    assert args.data_dir == "example_run"
    assert args.feedback_dir == os.path.join("example_run", "feedback")
    assert os.path.dirname(args.output_dir) == os.path.join("example_run", "feedback_models")
    # Told otherwise, it takes what it is told; a folder that is not there is refused, not tuned without.
    assert train_feedback.parse_args(["--model", "example_run/final_model", "--feedback_only",
                                      "--data_dir", "elsewhere"]).data_dir == "elsewhere"
    with pytest.raises(SystemExit):
        train_feedback.parse_args(["--model", "example_run/final_model", "--data_dir", "exmaple_run"])
