"""``python -m adamnp {demo,verify,bench}``: see :mod:`adamnp.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
