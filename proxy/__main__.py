"""`python -m proxy` is the `sluice` command."""

import sys

from proxy.cli import main

sys.exit(main())
