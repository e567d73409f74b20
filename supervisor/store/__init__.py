"""The store: the journal (SQLite, one writer) and the records read back from it.

Every read query of the trusted side is in `queries`; the stop report is here
because it is what the store keeps of a run's end. Imports only `mechanisms`.
"""
