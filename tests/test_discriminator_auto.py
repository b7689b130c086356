"""--discriminator auto never stops a run over MMS's critic: a failure to fetch or cache it (a full disk, a
read-only cache, the connection cut mid-download) falls back to a fresh critic with one line, as a file
missing from the Hub does."""

import errno

import filelock
import httpx2
import huggingface_hub
import pytest

import models
import training_flags

MMS_FILE = "facebook/mms-tts/full_models/kmr-script_latin/D_100000.pth"


@pytest.mark.parametrize("failure, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "OSError: [Errno 28] No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/hf/hub/.locks"), "PermissionError: [Errno 13]"),
    (OSError(errno.EROFS, "Read-only file system"), "OSError: [Errno 30] Read-only file system"),
    (filelock.Timeout("/hf/hub/.locks/D_100000.pth.lock"), "Timeout: The file lock"),
    (httpx2.ConnectError("connection reset\nwhile reading the body"), "ConnectError: connection reset)"),
])
def test_a_critic_that_cannot_be_fetched_or_cached_gives_a_fresh_one_and_one_line(failure, cause, monkeypatch,
                                                                                   capsys):
    def failing_download(repo_id, filename, **kwargs):
        assert f"{repo_id}/{filename}" == MMS_FILE
        raise failure
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    args = training_flags.parse(["--model", "facebook/mms-tts-kmr-script_latin", "--disc_channels", "64"])
    disc, path = models.critic_for_run(args, (None, None))
    assert path is None and isinstance(disc, models.VitsDiscriminator) and disc.max_channels == 64
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1
    line = printed[0]
    assert line.startswith(f"critic: a fresh one, trained alone first ({MMS_FILE} could not be fetched or cached (")
    assert cause in line
