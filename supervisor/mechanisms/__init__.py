"""OS mechanisms: cgroups (v2 and v1), process groups, identities, namespaces and mounts
planned for a sandbox, kernel limits, the state-directory lock, leftovers of dead supervisors.

Knows nothing of runs as the engine sees them; imports only the standard library,
psutil, `..errors` and the run side's `worker.platform` syscall wrappers.
"""
