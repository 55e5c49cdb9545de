"""The demo's espeak-ng corpus under its command name `python -m blspkd_jax.data.corpus`; the code
is `blspkd_jax.demo.corpus` (part of the demo: nothing else imports it)."""

import sys

from blspkd_jax.demo.corpus import main

if __name__ == "__main__":
    sys.exit(main())
