"""The ``compress`` command line. Results go to stdout (``--json``: one JSON document),
progress bars and notes to stderr. Exit codes: 0 ok, 2 usage, 3 bad input (or a file that
cannot be written), 4 budget not met, 130 interrupted (Ctrl-C).

The commands live beside this file by panel (run.py, stages.py, policies.py, deploy.py); each
parses its options, calls one function of the package, and prints.
"""

from __future__ import annotations

import sys
import warnings

from rich.markup import escape

from compressor.cli import deploy, policies, run, stages  # noqa: F401  (registers the commands)
from compressor.cli.common import app, err
from compressor.cli.run import EXIT_INTERRUPTED
from compressor.core.errors import CompressorError


def main() -> None:
    """Console entry point: user errors become one line on stderr and a distinct exit code."""
    # torch warns about the pickle protocol of files it then reads fine or refuses cleanly
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    try:
        app()
    except CompressorError as exc:
        message = escape(str(exc))
        err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:  # a run says what it kept and how to resume
        err.print(escape(str(exc) or "interrupted"), highlight=False, soft_wrap=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
