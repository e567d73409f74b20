"""The daemon's configuration file (TOML): defaults, agents, tools.

    [defaults]
    grace = 1.0                      # seconds between SIGTERM and SIGKILL
    containment = "auto"             # auto | cgroup | process-group
    isolation = "auto"               # auto | strict | off

    [agents.researcher]
    target = "myagents:research"     # a Python callable agent(message, **context), or
    # command = ["node", "agent.js"] # an argv agent (reads its message from the inbox)
    cwd = "/srv/agents/work"
    tools = ["send_email", "sessions.spawn"]
    limits = { tokens = 50000, wall_clock = 600 }
    peers = ["writer"]
    may_stop_sessions = false
    network = "none"                 # none | host | { proxy = ["api.example.com:443", "*.example.org"] }
    private_tmp = true
    grace = 2.0
    isolation = "strict"             # or "off" (trusted); default: [defaults] isolation
    env = { MODEL = "x" }

    [tools.send_email]
    target = "mytools:send_email"    # loaded in the daemon, or
    # provided = true                # relayed to the gateway client that provides it (tools.provide)

    [mcp_servers.git]                # the mcpServers shape: its tools become git.git_log, git.git_diff, ...
    command = "uvx"                  # or the whole argv as a list
    args = ["mcp-server-git", "--repository", "/srv/repo"]
    env = { GIT_AUTHOR_NAME = "agent" }
    cwd = "/srv"
    timeout = 60                     # seconds a call may take (TOOL_TIMEOUT past it)
    scope = "supervisor"             # or "session": a server per session, a contained run, killed with it
    # network = "none"               # a session-scoped server's network, as an agent's (none | host | { proxy })

These keys stay; new ones may be added. An unknown key, a wrong type or a
target that cannot be imported is a ConfigError naming the file, the key
and what is wrong. `module:function` targets are imported with the
configuration file's directory first on sys.path.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

from ..errors import DeadstopError
from ..egress.proxy import Proxy
from ..mechanisms.limits import Limits

_DEFAULT_KEYS = {"grace": (int, float), "containment": str, "isolation": str}
_AGENT_KEYS = {"target": str, "command": list, "cwd": str, "tools": list, "limits": dict, "peers": list,
               "may_stop_sessions": bool, "network": (str, dict), "private_tmp": bool, "grace": (int, float), "env": dict,
               "isolation": str}
_TOOL_KEYS = {"target": str, "provided": bool}
_MCP_KEYS = {"command": (str, list), "args": list, "env": dict, "cwd": str, "timeout": (int, float), "scope": str,
             "network": (str, dict)}
_CHOICES = {"containment": ("auto", "cgroup", "process-group"), "isolation": ("auto", "strict", "off"),
            "network": ("none", "host")}


class ConfigError(DeadstopError):
    """The configuration file is wrong: the message names the file, the key and what is wrong."""


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    name: str
    target: Any  # the imported callable, or the argv list
    options: dict[str, Any]  # register_agent's keyword arguments


@dataclasses.dataclass(frozen=True)
class ToolConfig:
    name: str
    target: Callable[..., Any] | None  # None: provided by a gateway client


@dataclasses.dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: tuple[str, ...]  # argv: command and args
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    timeout: float = 60.0
    scope: str = "supervisor"
    network: Any = "none"


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    path: str | None
    grace: float = 1.0
    containment: str = "auto"
    isolation: str = "auto"
    agents: tuple[AgentConfig, ...] = ()
    tools: tuple[ToolConfig, ...] = ()
    mcp_servers: tuple[McpServerConfig, ...] = ()


def load(path: str | None) -> DaemonConfig:
    """Read and check the file (None: an empty configuration, every default)."""
    if path is None:
        return DaemonConfig(None)
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    where = _Where(path)
    where.only(data, "", {"defaults": dict, "agents": dict, "tools": dict, "mcp_servers": dict})
    defaults = data.get("defaults", {})
    where.only(defaults, "defaults", _DEFAULT_KEYS)
    for key, choices in _CHOICES.items():
        if key in defaults and defaults[key] not in choices:
            raise where.error(f"defaults.{key}", f"must be one of {list(choices)}, not {defaults[key]!r}")
    grace = float(defaults.get("grace", 1.0))
    if grace < 0:
        raise where.error("defaults.grace", "must be >= 0")
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # before the supervisor opens: its spawner (and every run) inherits it
    tools = tuple(_tool(where, name, spec) for name, spec in data.get("tools", {}).items())
    agents = tuple(_agent(where, name, spec) for name, spec in data.get("agents", {}).items())
    servers = tuple(_mcp_server(where, name, spec) for name, spec in data.get("mcp_servers", {}).items())
    return DaemonConfig(path, grace, defaults.get("containment", "auto"), defaults.get("isolation", "auto"),
                        agents, tools, servers)


class _Where:
    def __init__(self, path: str):
        self.path = path

    def error(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {what}")

    def only(self, table: Any, prefix: str, allowed: dict[str, Any]) -> None:
        if not isinstance(table, dict):
            raise self.error(prefix or "(top)", f"must be a table, not {type(table).__name__}")
        for key, value in table.items():
            full = f"{prefix}.{key}" if prefix else key
            if key not in allowed:
                raise self.error(full, f"unknown key (known here: {', '.join(sorted(allowed))})")
            if not isinstance(value, allowed[key]) or isinstance(value, bool) and allowed[key] in ((int, float),):
                want = allowed[key].__name__ if isinstance(allowed[key], type) else "number"
                raise self.error(full, f"must be a {want}, not {type(value).__name__} {value!r}")


def _import(where: _Where, key: str, spec: str) -> Callable[..., Any]:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise where.error(key, f"{spec!r} is not 'module:function'")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise where.error(key, f"cannot load {spec!r}: {type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise where.error(key, f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _tool(where: _Where, name: str, spec: Any) -> ToolConfig:
    where.only(spec, f"tools.{name}", _TOOL_KEYS)
    if ("target" in spec) == bool(spec.get("provided")):
        raise where.error(f"tools.{name}", "needs exactly one of target = 'module:function' or provided = true")
    if spec.get("provided"):
        return ToolConfig(name, None)
    return ToolConfig(name, _import(where, f"tools.{name}.target", spec["target"]))


def _mcp_server(where: _Where, name: str, spec: Any) -> McpServerConfig:
    key = f"mcp_servers.{name}"
    where.only(spec, key, _MCP_KEYS)
    if "." in name:
        raise where.error(key, "a server's name may not contain '.' (its tools are named SERVER.TOOL)")
    if "command" not in spec:
        raise where.error(key, "needs command = 'program' (with args = [...]) or command = [argv...]")
    command = [spec["command"]] if isinstance(spec["command"], str) else list(spec["command"])
    command += list(spec.get("args", []))
    if not command or not all(isinstance(a, str) and a for a in command):
        raise where.error(f"{key}.command", "command and args must be non-empty strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.get("env", {}).items()):
        raise where.error(f"{key}.env", "must map names to strings")
    timeout = float(spec.get("timeout", 60.0))
    if timeout <= 0:
        raise where.error(f"{key}.timeout", "must be > 0")
    cwd = spec.get("cwd")
    if cwd is not None and not os.path.isabs(cwd):
        cwd = os.path.join(os.path.dirname(where.path), cwd)
    scope = spec.get("scope", "supervisor")
    if scope not in ("supervisor", "session"):
        raise where.error(f"{key}.scope", f"must be 'supervisor' or 'session', not {scope!r}")
    network = _network(where, key, spec.get("network", "none"))
    if network != "none" and scope != "session":
        raise where.error(f"{key}.network", "applies to scope = 'session' (a supervisor-scoped server is a plain "
                                            "child process with the daemon's own network)")
    return McpServerConfig(name, tuple(command), tuple(sorted(spec.get("env", {}).items())), cwd, timeout, scope,
                           network)


def _network(where: _Where, key: str, network: Any) -> Any:
    """none | host | { proxy = ["HOST:PORT", ...] } -> the run option."""
    if isinstance(network, dict):
        if set(network) != {"proxy"} or not isinstance(network["proxy"], list):
            raise where.error(f"{key}.network", "a table is { proxy = [\"HOST:PORT\", ...] }: the run reaches only "
                                                "those, through the supervisor's proxy")
        try:
            return Proxy(allow=network["proxy"])
        except ValueError as exc:
            raise where.error(f"{key}.network.proxy", str(exc)) from None
    if network not in _CHOICES["network"]:
        raise where.error(f"{key}.network", f"must be one of {list(_CHOICES['network'])} or {{ proxy = [...] }}, "
                                            f"not {network!r}")
    return network


def _agent(where: _Where, name: str, spec: Any) -> AgentConfig:
    key = f"agents.{name}"
    where.only(spec, key, _AGENT_KEYS)
    if ("target" in spec) == ("command" in spec):
        raise where.error(key, "needs exactly one of target = 'module:function' or command = [argv...]")
    if "command" in spec:
        command = spec["command"]
        if not command or not all(isinstance(a, str) for a in command):
            raise where.error(f"{key}.command", "must be a non-empty list of strings")
        target: Any = list(command)
    else:
        target = _import(where, f"{key}.target", spec["target"])
    for list_key in ("tools", "peers"):
        if not all(isinstance(v, str) for v in spec.get(list_key, [])):
            raise where.error(f"{key}.{list_key}", "must be a list of strings")
    if "isolation" in spec and spec["isolation"] not in _CHOICES["isolation"]:
        raise where.error(f"{key}.isolation", f"must be one of {list(_CHOICES['isolation'])}, not {spec['isolation']!r}")
    network = _network(where, key, spec.get("network", "none"))
    options: dict[str, Any] = {k: v for k, v in spec.items() if k not in ("target", "command", "limits")}
    if "network" in spec:
        options["network"] = network
    if "limits" in spec:
        try:
            options["limits"] = Limits.coerce(spec["limits"])
        except (TypeError, ValueError, DeadstopError) as exc:
            raise where.error(f"{key}.limits", str(exc)) from None
    if "cwd" in spec and not os.path.isabs(spec["cwd"]):
        options["cwd"] = os.path.join(os.path.dirname(where.path), spec["cwd"])
    return AgentConfig(name, target, options)
