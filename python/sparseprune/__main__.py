"""``python -m sparseprune``: the ``sparseprune`` command (:mod:`sparseprune.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
