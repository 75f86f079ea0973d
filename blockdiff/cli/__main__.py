"""``python -m blockdiff.cli`` = the ``blockdiff`` command."""

import sys

from blockdiff.cli.app import main

sys.exit(main())
