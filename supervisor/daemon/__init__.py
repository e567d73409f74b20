"""`deadstop serve`: one long-lived supervisor serving the control verbs over ZeroMQ.

config.py reads the TOML file; server.py binds the sockets, answers the
verbs for each connection's Principal, relays gateway-provided tools and
publishes the event stream.
"""
