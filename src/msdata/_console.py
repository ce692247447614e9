"""The ``msdata`` console script's entry point: without the ``cli`` extra (Click, Rich) it
prints one line naming the extra and exits 1, instead of an import traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from msdata.errors import MissingDependencyError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``msdata.cli.main``; exit 1 with one line on stderr if the extra is missing."""
    try:
        from msdata.cli import main as cli_main
    except MissingDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    cli_main(argv)
