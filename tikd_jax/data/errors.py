"""Errors in the user's data, or in the config that points at it: the message says which file or
folder and what to do. `main.py` prints them as `error: <message>` (exit status 2) without a
traceback, as `python -m tikd_jax.text_teacher` does; every other exception keeps its traceback.
"""


class DataError(ValueError):
  """The data (or the config that names it) is wrong in a way the user fixes."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A data folder, archive or prepared data set that is not there."""
