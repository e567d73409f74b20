"""The web console: served by the daemon, a client of its control verbs (see server.py)."""
