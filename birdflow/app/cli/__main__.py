"""`python -m birdflow.app.cli`: what the `birdflow` script runs (the supervisor starts its children so)."""

import sys

from birdflow.app.cli import main

sys.exit(main())
