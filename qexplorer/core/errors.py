"""Errors meant for people.

A :class:`UserError` carries one sentence that says what was wrong and what to
do. The CLI prints it and exits 2; the app shows it in a notification. Anything
else is a bug and gets a traceback only with ``--debug``.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unmet precondition, explained in one sentence."""

    exit_code = 2


class ModelReadError(UserError):
    """A model file or folder that cannot be read as a model."""
