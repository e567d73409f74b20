"""`python -m deadstop.supervisor` is the `deadstop` command."""

from .facades.cli import main

raise SystemExit(main())
