"""``python -m quantcore``: the ``quantcore`` command (quantcore.cli), e.g. where the console script is
not on PATH."""
import sys

from .cli import main

sys.exit(main())
