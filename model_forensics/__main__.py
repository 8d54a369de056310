"""``python -m model_forensics`` = the ``forensics`` CLI."""

from model_forensics.cli import main

raise SystemExit(main())
