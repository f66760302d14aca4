"""``python -m brecq`` (and ``torchrun -m brecq``): the command line."""
import sys

from .cli import main

sys.exit(main())
