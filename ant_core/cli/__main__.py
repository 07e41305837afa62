"""`python -m ant_core.cli` (what torchrun -m runs)."""
import sys

from . import main

sys.exit(main())
