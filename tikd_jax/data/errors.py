"""Errors in what a run reads (the data, and the folders and checkpoints the config names) that the
user fixes: the message says which file or folder and what to do. `main.py` prints them as
`error: <message>` (exit status 2) without a traceback, as `python -m tikd_jax.text_teacher` does;
every other exception keeps its traceback.
"""

# The exit status of a command stopped by such an error (main.py, python -m tikd_jax.text_teacher,
# python -m convert.*), argparse's for a usage error.
EXIT_USER_ERROR = 2


class DataError(ValueError):
  """The data, or a path the config names, is wrong in a way the user fixes."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A data folder, archive, prepared data set or named checkpoint that is not there."""
