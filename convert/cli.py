"""The conversion commands' exit: a user error is one 'error:' line and exit status 2.

The converters raise FileNotFoundError (no such file or workdir) and ValueError (weights that do
not fit, contradicting flags) with messages that say what to change; a traceback above them adds
nothing. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

from tikd_jax.data.errors import EXIT_USER_ERROR


def run(main: Callable[[], object]) -> None:
  try:
    main()
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
