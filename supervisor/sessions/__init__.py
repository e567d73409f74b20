"""Sessions on top of the engine: agents, generations, takeover, tree stop, the
session registry and the `sessions.*` tools a run may call.
"""
