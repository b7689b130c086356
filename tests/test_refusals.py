"""A mistyped flag ends at once: one line on stderr, no usage block, no traceback, a non-zero exit, before any
network call and without loading torch (which alone takes seconds), with the Hub unreachable. And --help
loads no torch either."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs a command as `python COMMAND ARGS` would, then says on its last stdout line whether torch was loaded.
RUN_AND_TELL = """
import runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as end:
    code = end.code
print("torch loaded:", "torch" in sys.modules)
sys.exit(code)
"""

TYPOS = [
    ("train_vits.py", "--model", "example_run/final_modl"),
    ("train_feedback.py", "--model", "example_run/final_modl"),
    ("train_feedback.py", "--data_dir", "exmaple_run"),
    ("train_feedback.py", "--promote", "example_run/feedback_models/2026"),
    ("train_feedback.py", "--compare", "example_run/feedback_models/2026"),
    ("train_feedback.py", "--listen", "sentences.tx"),
    ("speak.py", "--model", "example_run/final_modl", "Silav"),
    ("speak.py", "--data_dir", "exmaple_run", "Silav"),
    ("prepare_data.py", "--input", "cv-corpus.tar.gzz", "--output_dir", "example_run"),
    ("train_vits.py", "--batch_size", "0"),
    ("train_feedback.py", "--no_such_flag"),
    ("speak.py", "--no_such_flag"),
]


def run(tmp_path, *argv):
    (tmp_path / "example_run").mkdir(exist_ok=True)  # a local folder: example_run/... names a local path
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9",
               HF_HOME=str(tmp_path / "hf"))
    return subprocess.run([sys.executable, "-c", RUN_AND_TELL, os.path.join(ROOT, argv[0]), *argv[1:]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv", TYPOS, ids=[" ".join(t) for t in TYPOS])
def test_a_typo_ends_in_one_line_before_torch_or_the_network(argv, tmp_path):
    done = run(tmp_path, *argv)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "error:" in lines[0] and "Traceback" not in done.stderr and "usage:" not in done.stderr
    assert any(word in lines[0] for word in argv[1:]), "the line names what was mistyped"
    assert done.stdout.strip().splitlines()[-1] == "torch loaded: False"


@pytest.mark.parametrize("command", ["train_vits.py", "train_feedback.py", "speak.py", "prepare_data.py"])
def test_help_loads_no_torch(command, tmp_path):
    done = run(tmp_path, command, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "torch loaded: False"
