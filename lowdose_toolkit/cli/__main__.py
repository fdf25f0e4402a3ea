"""``python -m lowdose_toolkit.cli``: the ``ldt`` command."""

import sys

from lowdose_toolkit.cli.app import main

sys.exit(main())
