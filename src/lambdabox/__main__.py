"""``python -m lambdabox``: the same as the ``lambdabox`` command."""

from lambdabox.cli import main

main()
