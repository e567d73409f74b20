"""The user's own agent for `deadstop bench --target MODULE:ATTR` or `--argv CMD ...`.

`MODULE:ATTR` is resolved the way uvicorn and gunicorn resolve an application:
the current directory first on sys.path, then an import of MODULE and a walk
down the dotted ATTR. The directory stays on sys.path, so the supervisor's
spawner (and every run it forks) inherits it, and the target's own module
travels by value as well (cloudpickle), so a run whose identity cannot read
the user's directory still gets the code it runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import sys
from typing import Any, Callable

from .errors import UsageError


class TargetError(UsageError):
    """A --target, --argv or --tool that names nothing runnable; the message says what and where it looked."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What the benchmark starts: a Python callable (`fn`) or a command (`argv`), and its name in the report."""

    label: str
    fn: Callable[..., Any] | None = None
    argv: tuple[str, ...] = ()


def _on_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.insert(0, directory)


def resolve(spec: str, what: str = "--target") -> Callable[..., Any]:
    """The callable `spec` ("module:attr" or "module:obj.attr") names; TargetError says why not."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"{what} {spec!r}: expected MODULE:ATTR, e.g. myagent:run")
    _on_path(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise TargetError(f"{what} {spec!r}: no module named {exc.name!r} "
                              f"(looked in {os.getcwd()} and on sys.path)") from None
        raise TargetError(f"{what} {spec!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:  # the user's module raised while importing: say so, with its own words
        raise TargetError(f"{what} {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise TargetError(f"{what} {spec!r}: {attr!r} is not callable (an object of type {type(obj).__name__})")
    import cloudpickle

    if module_name != "__main__":
        cloudpickle.register_pickle_by_value(module)
    return obj


def from_spec(spec: str) -> Target:
    return Target(label=spec, fn=resolve(spec))


def from_argv(argv: list[str]) -> Target:
    """A command run as the agent; its program must exist (found on PATH as the run will look for it)."""
    if not argv:
        raise TargetError("--argv: give the command after it, e.g. --argv node agent.js")
    if shutil.which(argv[0]) is None:
        raise TargetError(f"--argv: command {argv[0]!r} not found on PATH")
    return Target(label=" ".join(argv), argv=tuple(argv))


def tool_spec(spec: str) -> tuple[str, Callable[..., Any] | None]:
    """`--tool NAME` (a no-op tool the bench provides) or `--tool NAME=MODULE:ATTR` (the user's handler)."""
    name, sep, handler = spec.partition("=")
    if not name or (sep and not handler):
        raise TargetError(f"--tool {spec!r}: expected NAME or NAME=MODULE:ATTR")
    return name, resolve(handler, "--tool") if handler else None
