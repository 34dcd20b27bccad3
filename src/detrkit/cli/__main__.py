"""``python -m detrkit.cli``: the ``detrkit`` command."""

import sys

from detrkit.cli import main

sys.exit(main())
