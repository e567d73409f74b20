"""The run engine: the run state machine, the one stop sequence, and the engine that
starts runs, routes the broker's callbacks to them and publishes their events.

It knows nothing of sessions: a run's owner is a `RunOwner` (a protocol), and
runs reach the engine only through the `RunServices` they are given.
"""
