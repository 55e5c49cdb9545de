"""The demo's sentence list under its command name `python -m blspkd_jax.data.sentences`; the code
is `blspkd_jax.demo.sentences` (part of the demo: nothing else imports it)."""

import sys

from blspkd_jax.demo.sentences import main

if __name__ == "__main__":
    sys.exit(main())
