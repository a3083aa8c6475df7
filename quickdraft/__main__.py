"""``python -m quickdraft``: the same command line as ``quickdraft``."""

from quickdraft.cli import main

raise SystemExit(main())
