"""The run host: the spawner process that forks, confines and reaps runs, and the
recovery of runs a dead supervisor left behind.

A host launches, signals, waits and cleans up; a remote host could implement the
same calls. Imports `mechanisms` and `store`.
"""
