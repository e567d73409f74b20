"""The tree-stop floors' helper: deadstop.supervisor.bench.treefloor, under the name the scripts here import."""

from deadstop.supervisor.bench.treefloor import _reap_all, cgroup_kill_floor, killpg_floor  # noqa: F401
