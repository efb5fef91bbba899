"""``python -m distkern.bench [options]``: the same as ``distkern bench [options]``."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
