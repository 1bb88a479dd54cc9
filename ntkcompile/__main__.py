"""``python -m ntkcompile``: the command line (``ntkcompile/cli``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
