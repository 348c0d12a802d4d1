"""The project's one exception for a user's mistake, and the kinds built on it.

A command prints a `UserError` as one line (`error: ...`, exit code 2) and stops; anything else,
a `ValueError` from a shape check inside a training step included, is a bug and keeps its
traceback (`llmfs.cli.run`). Each kind keeps the built-in base it had before (ValueError,
RuntimeError), so code that catches those still catches it.

The kinds: `InvalidInput` (a bad value, option or file content) and, built on it,
`llmfs.checkpoint.CheckpointFileError` (a model or checkpoint file that is empty, damaged, of another
kind, or holds a config no model can have) and `CheckpointMismatchError` (weights that do not fit the
model); `llmfs.download.DataUnavailableError`, `ChecksumError`, `EndpointStalled` and `HubUnavailable`;
`llmfs.runtime.DeviceUnavailableError`; `PretrainedWeightsUnavailable` (below) and
`ch05.llama.llama3.LLMUnavailable`. A programming error (a wrongly shaped tensor passed by code, a
listing called with impossible arguments) stays a plain ValueError or TypeError: a command checks a
user's value before it reaches such a check.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done: a bad option, a missing or unreadable input,
    an unavailable device, data or weights. The message says what to do instead."""


class InvalidInput(UserError, ValueError):
    """A value the user gave (an option, a file's content, a setting) is out of range or malformed."""


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights cannot be had here (offline, no cached copy); the message says how to get them."""


def quiet_interrupt_while_starting() -> None:
    """Under `python -m <command>`, Ctrl-C before the command's error path is in place (importing
    PyTorch takes seconds) prints one line instead of a traceback through the import machinery.

    Called from the chapter packages' `__init__`, which `python -m chNN.module` imports first (while
    `sys.argv[0]` is still "-m"); a notebook kernel or a reader's own script is left as it is. Only
    KeyboardInterrupt is affected, and the process still ends as Ctrl-C ends it (exit status 130).
    """
    import sys

    if sys.argv[:1] != ["-m"] or getattr(sys.excepthook, "quiet_interrupt", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print("\ninterrupted while starting: nothing was done", file=sys.stderr)
        else:
            previous(kind, value, tb)

    hook.quiet_interrupt = True
    sys.excepthook = hook
