"""Agents the daemon benchmark's configuration names (`benchmarks._daemon_targets:<name>`)."""

from __future__ import annotations

from benchmarks._targets import announce, sleep_forever


def sleeper(message: dict, **context) -> None:
    announce(message["ready"], message["tag"])
    sleep_forever()


def echo(message, **context):
    return message


def emitter(message: dict, **context) -> int:
    """Emit message["count"] small events back to back (async, pipelined), then return."""
    import asyncio

    from deadstop.worker import egress

    async def go() -> None:
        pending = [egress.aemit("tick", {"i": i}) for i in range(message["count"])]
        await asyncio.gather(*pending)

    asyncio.run(go())
    return message["count"]
