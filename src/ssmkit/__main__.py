"""``python -m ssmkit`` runs the command line (also under ``torchrun``)."""

import sys

from ssmkit.cli import main

sys.exit(main())
