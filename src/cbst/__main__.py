"""Allow ``python -m cbst``."""

from cbst.cli import main

raise SystemExit(main())
