"""``python -m distkern``: the same as the ``distkern`` command."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
