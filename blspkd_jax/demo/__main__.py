"""`python -m blspkd_jax.demo`: the embedded default end to end (`make demo`)."""

import sys

from blspkd_jax.demo.stages import main

sys.exit(main())
