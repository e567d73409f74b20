"""Egress: the broker that every byte a run sends leaves through, its per-run channels
and the tool registry.

Imports `store` (every decision is journaled) and the wire in `ipc`; it reports
to its sink (the engine) through the `BrokerSink` protocol, never by import.
"""
