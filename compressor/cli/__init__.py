"""The ``compress`` command line (Typer): thin commands that parse, call one function of the
package, and print."""

from compressor.cli.app import app, main

__all__ = ["app", "main"]
