"""``python -m autobatch`` runs the command line."""

import sys

if __name__ == "__main__":
    from autobatch.cli import main

    sys.exit(main())
