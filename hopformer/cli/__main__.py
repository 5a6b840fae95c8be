"""``python -m hopformer.cli``: the same as ``hopformer`` and ``python -m hopformer``."""

from hopformer.cli import main

raise SystemExit(main())
