"""`deadstop doctor`: what this host gives runs, layer by layer, and why a layer is missing.

It opens a real supervisor (the same probe every supervisor makes at open)
and prints its isolation profile and containment layer, so what it says is
what runs get, not a guess from kernel version numbers.
"""

from __future__ import annotations

import json
from typing import TextIO

from ..mechanisms import isolation as iso


def run_doctor(out: TextIO, *, as_json: bool = False, strict: bool = False) -> int:
    """Print the report; returns 1 if `strict` and a layer is missing, else 0."""
    from .. import Supervisor

    with Supervisor() as sup:
        profile = sup.isolation
        containment = sup.containment
        degraded = sup.core.containment_degraded_reason
    if as_json:
        out.write(json.dumps({"containment": containment, "containment_degraded": degraded or None,
                              "isolation": profile.to_dict(), "root": profile.is_root}, indent=2) + "\n")
    else:
        out.write(f"containment: {containment}" + (f" ({degraded})" if degraded else "") + "\n")
        out.write(f"running as root: {'yes' if profile.is_root else 'no'}\n\n")
        width = max(len(name) for name in iso.LAYERS)
        for layer in profile.layers:
            verdict = "yes" if layer.active else "NO "
            out.write(f"  {layer.name:<{width}}  {verdict}  {layer.detail}\n")
        missing = profile.missing
        out.write("\n" + ("every isolation layer is in place\n" if not missing else
                          f"{len(missing)} layer(s) missing; Supervisor(isolation='strict') would refuse to open\n"))
    return 1 if strict and profile.missing else 0
