"""``python -m compressor.cli``."""

from compressor.cli.app import main

main()
