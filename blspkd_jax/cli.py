"""What every command shares: quiet logs unless `--verbose`, one line (not a traceback) for a
mistake the user can fix, and a Ctrl-C that ends the command at once with a word on what to do."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from blspkd_jax.errors import UserError
from blspkd_jax.training.config import ConfigError

# Errors whose message names the file, line or config key to fix: printed as one line. Every
# part's own error type (DataError, WeightsError, ...) is a UserError, so none of those modules,
# and none of the libraries behind them, is imported before the command parses its arguments.
USER_ERRORS = (UserError, FileNotFoundError)
EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the INFO logs of JAX, orbax and the other libraries",
    )


def setup_logging(verbose: bool = False) -> None:
    """Our own INFO lines always; other libraries' (orbax's checkpoint chatter through absl,
    JAX's backend probing) only with `verbose`."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("blspkd_jax").setLevel(logging.INFO)
    from absl import logging as absl_logging  # orbax logs through absl

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)


def run(body: Callable[[], int], *, interrupted: str) -> int:
    """`body()`'s exit code; a user error prints `error: MESSAGE` and gives 2 (a config error) or
    1; Ctrl-C prints `interrupted` and leaves at once (a half-built JAX runtime can crash in the
    interpreter's own shutdown, so no cleanup runs after that message)."""
    try:
        return body()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
