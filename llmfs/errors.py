"""The project's one exception for a user's mistake, and the kinds built on it.

A command prints a `UserError` as one line (`error: ...`, exit code 2) and stops; anything else,
a `ValueError` from a shape check inside a training step included, is a bug and keeps its
traceback (`llmfs.cli.run`). Each kind keeps the built-in base it had before (ValueError,
RuntimeError), so code that catches those still catches it.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done: a bad option, a missing or unreadable input,
    an unavailable device, data or weights. The message says what to do instead."""


class InvalidInput(UserError, ValueError):
    """A value the user gave (an option, a file's content, a setting) is out of range or malformed."""


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights cannot be had here (offline, no cached copy); the message says how to get them."""
