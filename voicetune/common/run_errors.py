"""How a command ends early: a flag it cannot take, or TrainingError, each in the one line that says why and
what to do."""

import argparse
import sys


class FlagParser(argparse.ArgumentParser):
    """argparse whose refusals are the one line that matters and a pointer to --help, not the usage block above it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class TrainingError(RuntimeError):
    """A run that cannot go on safely; the message says why and what to do."""


def report_fatal(err, output_dir, interrupted="checkpoints already saved are kept (--resume auto continues)"):
    """One line on stderr for what ended a run early, and the exit code: 130 for Ctrl-C, else 2.

    `interrupted` says what an interrupted run keeps and how to go on.
    """
    if isinstance(err, KeyboardInterrupt):  # before training (preload, benchmark) or a second one during it
        print(f"error: interrupted; {interrupted}", file=sys.stderr)
        return 130
    if isinstance(err, OSError):  # e.g. a full disk while saving: one line, not a chain of tracebacks
        print(f"error: {err.filename or output_dir}: {err.strerror or err}", file=sys.stderr)
    else:
        print(f"error: {err}", file=sys.stderr)
    return 2
