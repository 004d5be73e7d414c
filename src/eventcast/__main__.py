"""``python -m eventcast``: the command line (see :mod:`eventcast.cli`)."""

from .cli import main

raise SystemExit(main())
