"""Errors raised by the data layer: one line that names the file, the column or the task at fault."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset cannot be read as asked: unknown task or split, wrong column name, unparsable label."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """No data file where the task or the caller said it would be; the message lists the paths tried."""
