"""What users hold: the asyncio `AsyncSupervisor`, the blocking `Supervisor`, the
read-only `StateView`, and the command line. Top of the stack: imports anything below.
"""
