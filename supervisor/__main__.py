"""`python -m deadstop.supervisor` is the `deadstop` command."""

from .cli import main

raise SystemExit(main())
