"""`python -m tikd_jax.visualize …`: see tikd_jax/visualize/cli.py."""
from absl import logging

from tikd_jax.visualize.cli import main

logging.set_verbosity(logging.ERROR)  # orbax's read-only restore warnings are noise here
main()
