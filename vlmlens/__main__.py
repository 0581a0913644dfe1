"""``python -m vlmlens``: see :mod:`vlmlens.cli` (the command registry lives there, so that
plugins registering commands on import see one registry, not a second ``__main__`` copy)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
