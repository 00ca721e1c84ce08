"""``python -m kvcomm`` is the ``kvcomm`` command."""

from kvcomm.cli import run

run()
