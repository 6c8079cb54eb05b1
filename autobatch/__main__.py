"""``python -m autobatch`` runs the command line."""

import sys

from autobatch.cli import main

sys.exit(main())
