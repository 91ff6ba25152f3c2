"""Errors that map to the CLI's exit codes: 2 for bad input, 1 for anything internal."""

from __future__ import annotations


class QconvError(Exception):
    """Base of qconv's own errors. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class InputError(QconvError):
    """The user's input (a path, a file's contents, an option) is unusable. One line, names the culprit."""

    exit_code = 2


class VerificationError(QconvError):
    """A packed layout did not dequantize back to the method's weights: the write is aborted."""

    exit_code = 1
