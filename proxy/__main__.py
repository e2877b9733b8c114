"""`python -m proxy` is the `sluice` command."""

import sys

from proxy.cli.main import main

sys.exit(main())
