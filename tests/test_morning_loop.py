"""The demo's loop walked by its printed hints alone: a night in the demo's home folder (data and run in one
folder, as demo.sh and the README's real night lay it out), then only the command lines it and each next step
print, run as printed with the Python they name: the listening page (corrections recorded through its save
route), the tune its footer names, the blind comparison (answered through its HTTP API), the promote and the
rollback. It ends with the night's voice current again, byte for byte.

Flags added to a printed line, and why (nothing else is added): --port 0 to each served page (any free port:
tests run side by side); the tune's tiny sizes (QUICK's and --max_steps 2, --feedback_weight 1, --val_size 2,
--eval_clips 1), else a 30-minute tune; --force to the promote only where the printed line itself says the
verdict refuses it unless --force.
"""

import html
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import http.client
from urllib.parse import quote

import pytest
import soundfile as sf

from conftest import FEEDBACK_TEXTS, QUICK, ROOT
from examples.make_release import espeak_clip
from voicetune.common import run_files

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the served pages are stopped with SIGINT (Ctrl-C)")

HOME = "example_run"
TUNE_SPEED = QUICK + ["--max_steps", "2", "--feedback_weight", "1", "--val_size", "2", "--eval_clips", "1",
                      "--d_warmup_steps", "0"]


def hint(text, said):
    """The command line printed after `said` in `text` (the rest of that line)."""
    found = re.findall(re.escape(said) + r"(.+)", text)
    assert found, f"no {said!r} line in:\n{text}"
    return found[-1].strip()


def run(line, cwd, *extra, timeout=600):
    """Run a printed command line as printed (plus `extra` flags); its output, once it ended well."""
    done = subprocess.run(shlex.split(line) + list(extra), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    return done.stdout


class Served:
    """A printed page command running until Ctrl-C: its port, its requests, and its closing lines."""

    def __init__(self, line, cwd):
        self.proc = subprocess.Popen(shlex.split(line) + ["--port", "0"], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.said = []
        for said in self.proc.stdout:
            self.said.append(said)
            match = re.search(r"open http://127\.0\.0\.1:(\d+)/ in a browser", said)
            if match:
                self.port = int(match.group(1))
                return
        pytest.fail(f"{line} ended without serving:\n{''.join(self.said)}")

    def request(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request(method, path, body=body)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        assert response.status == 200, (method, path, response.status, data[:300])
        return json.loads(data)

    def stop(self):
        """Ctrl-C; everything it printed."""
        self.proc.send_signal(signal.SIGINT)
        rest, _ = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, "".join(self.said) + rest
        return "".join(self.said) + rest


def page_commands(page_file):
    with open(page_file, encoding="utf-8") as f:
        return [html.unescape(c) for c in re.findall(r"<code>([^<]*)</code>", f.read())]


@pytest.fixture(scope="module")
def walked(prepared_dataset, tiny_model_dir, tmp_path_factory):
    """The loop walked in a fresh folder; {step: what it printed}, the folder, and the interpreter it ran."""
    cwd = str(tmp_path_factory.mktemp("user"))
    python = sys.executable
    if sys.prefix != sys.base_prefix:
        # The user's own .venv in the folder they work in, run without activating it, as the README says.
        os.symlink(sys.prefix, os.path.join(cwd, ".venv"), target_is_directory=True)
        python = os.path.relpath(os.path.join(cwd, ".venv", os.path.relpath(sys.executable, sys.prefix)), cwd)
    home = os.path.join(cwd, HOME)
    shutil.copytree(prepared_dataset, home)  # prepare_data.py --output_dir example_run
    printed = {}
    printed["night"] = run(shlex.join([python, os.path.join(ROOT, "train_vits.py"), "--model", tiny_model_dir,
                                       "--data_dir", HOME, "--output_dir", HOME, "--max_steps", "2",
                                       "--eval_clips", "1", "--val_size", "2"] + QUICK), cwd)
    night_voice = run_files.voice_fingerprint(os.path.join(home, run_files.FINAL_MODEL))

    # The listening page the night points to: every sentence spoken, four of them corrected.
    page = Served(hint(printed["night"], "next: hear the voice sentence by sentence and record what it says badly: "),
                  cwd)
    state = page.request("GET", "/api/session")
    for row, text in enumerate(FEEDBACK_TEXTS):
        audio = io.BytesIO()
        sf.write(audio, espeak_clip(text, 16000), 16000, format="WAV")
        state = page.request("POST", f"/api/save/{row}?text={quote(text)}", audio.getvalue())
    printed["footer"] = state["command"]
    printed["listen"] = page.stop()

    # The tune the page's footer names, then the blind comparison it points to, answered by one listener.
    printed["tune"] = run(printed["footer"], cwd, *TUNE_SPEED)
    compare = Served(hint(printed["tune"], "blind, with: "), cwd)
    listener = compare.request("POST", "/api/listeners", b'{"name": "Rojda"}')
    for row in range(listener["total"]):
        listener = compare.request("POST", f"/api/choose/{listener['listener']}/{row}", b'{"choice": "same"}')
    assert listener["done"]
    printed["compare"] = compare.stop()

    promote = hint(printed["compare"], "put it to use with: ")
    forced = promote.endswith(" (refused unless --force: the verdict is reject)")
    printed["promote"] = run(promote.split(" (refused")[0], cwd, *(["--force"] if forced else []))
    printed["rollback"] = run(hint(printed["promote"], "back to version 1 with: "), cwd)
    return dict(printed=printed, cwd=cwd, home=home, python=python, night_voice=night_voice)


def test_the_loop_by_its_printed_hints_ends_with_the_nights_voice_current_byte_for_byte(walked):
    home = walked["home"]
    voice = os.path.join(home, run_files.PROMOTED)
    assert run_files.voice_fingerprint(voice) == walked["night_voice"]
    assert run_files.voice_fingerprint(os.path.join(home, run_files.FINAL_MODEL)) == walked["night_voice"]
    with open(os.path.join(home, "voices.json"), encoding="utf-8") as f:
        history = json.load(f)
    assert history["current"] == 1 and [v["replaces"] for v in history["versions"]] == [None, 1]
    assert history["versions"][0]["model_sha256"] == walked["night_voice"]["model.safetensors"]
    assert [e["action"] for e in history["events"]] == ["promote", "rollback"]
    # Everything lived in the one home folder: the session, the recordings, the tune.
    assert sorted(os.listdir(os.path.join(home, run_files.FEEDBACK))) == [
        f"audio_{i:03d}.{ext}" for i in range(1, 5) for ext in ("txt", "wav")]
    assert len(os.listdir(os.path.join(home, run_files.SESSIONS))) == 1
    assert len(os.listdir(os.path.join(home, run_files.FEEDBACK_MODELS))) == 1


def test_every_hint_names_the_python_that_ran_and_the_home_folder(walked):
    printed, python = walked["printed"], walked["python"]
    if os.path.isabs(python):
        pytest.skip("not run from a virtual environment: the hints name the full path, checked in test_run_files")
    assert python == os.path.join(".venv", "bin", "python") or python.startswith(os.path.join(".venv", "bin", ""))
    train_feedback = os.path.join(ROOT, "train_feedback.py")
    lines = [line for text in printed.values() for line in text.splitlines()
             if "train_feedback.py" in line and " --" in line] + [printed["footer"]]
    assert len(lines) >= 8, lines
    for line in lines:
        command = line[line.index(python + " "):]
        assert command.startswith(f"{python} {train_feedback} "), line
    voice = os.path.join(HOME, run_files.FINAL_MODEL)
    sentences = os.path.join(ROOT, run_files.SENTENCES)
    assert f"{python} {train_feedback} --listen {sentences} --model {voice} --data_dir {HOME}" in printed["night"]
    assert printed["footer"] == f"{python} {train_feedback} --model {voice} --data_dir {HOME}"
    assert f"train on them with: {printed['footer']}" in printed["listen"]
    session = os.path.join(HOME, run_files.SESSIONS, os.listdir(os.path.join(walked["home"], run_files.SESSIONS))[0])
    assert f"resume with: {python} {train_feedback} --listen {session} --model {voice} --data_dir {HOME}\n" in \
        printed["listen"]
    tune = os.path.join(HOME, run_files.FEEDBACK_MODELS, os.listdir(os.path.join(walked["home"],
                                                                                  run_files.FEEDBACK_MODELS))[0])
    assert f"{python} {train_feedback} --compare {tune} --data_dir {HOME}\n" in printed["tune"]
    assert f"put it to use with: {python} {train_feedback} --promote {tune} --data_dir {HOME}" in printed["compare"]
    assert f"back to version 1 with: {python} {train_feedback} --rollback --data_dir {HOME}\n" in printed["promote"]


def test_the_pages_say_what_the_terminal_says(walked):
    home, printed = walked["home"], walked["printed"]
    night_page = page_commands(os.path.join(home, run_files.PAGE))
    assert night_page == [hint(printed["night"], "next: hear the voice sentence by sentence and record what it "
                                                 "says badly: "), printed["footer"]]
    tune = os.path.join(home, run_files.FEEDBACK_MODELS, os.listdir(os.path.join(home, run_files.FEEDBACK_MODELS))[0])
    promote = hint(printed["compare"], "put it to use with: ").split(" (refused")[0]
    assert promote in page_commands(os.path.join(tune, run_files.PAGE))
