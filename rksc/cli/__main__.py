"""`python -m rksc.cli ...`, as the `rksc` command."""

import sys

from rksc.cli import main

sys.exit(main())
