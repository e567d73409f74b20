"""The benchmark harness behind `deadstop bench`: the kill benchmark and your own agent's figures,
each beside the floors of this host measured in the same run.

Modules, one job each: stats (percentiles, rows, the table), procs (the ready FIFO, pidfds, cgroup
and subreaper plumbing), targets (code the measured processes run), floors and treefloor (the same
jobs done with bare primitives), peers (other libraries' stops), runs (deadstop's side of the kill
benchmark), kill (its phases and rows), usertarget and agent (your agent), progress, report
(table, --json), plot (--plot) and command (the options).

Nothing is imported here: the measured processes import `targets`, and a multiprocess spawn child
must not pay for more than that.
"""
