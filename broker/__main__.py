"""Allow ``python -m broker``."""

import sys

from broker.cli import main

sys.exit(main())
