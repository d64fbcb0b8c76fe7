"""`python -m tikd_jax.visualize …`: see tikd_jax/visualize/cli.py."""
from tikd_jax.visualize.cli import main

main()
