"""``python -m iclsim ...``: the command line of ``iclsim.cli``."""

import sys

from iclsim.cli import main

if __name__ == "__main__":
    sys.exit(main())
