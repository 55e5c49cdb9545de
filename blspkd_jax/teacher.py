"""The demo's stand-in teacher LM under its command name `python -m blspkd_jax.teacher`; the code
is `blspkd_jax.demo.teacher` (part of the demo: nothing else imports it)."""

import sys

from blspkd_jax.demo.teacher import main

if __name__ == "__main__":
    sys.exit(main())
