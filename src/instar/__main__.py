"""``python -m instar``: the same entry point as the ``instar`` command."""

from instar.cli import main

raise SystemExit(main())
