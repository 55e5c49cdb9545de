"""The demo's stand-in Whisper encoder under its command name `python -m blspkd_jax.asr_encoder`;
the code is `blspkd_jax.demo.asr_encoder` (part of the demo: nothing else imports it)."""

import sys

from blspkd_jax.demo.asr_encoder import main

if __name__ == "__main__":
    sys.exit(main())
