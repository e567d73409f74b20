"""The model call as a brokered tool: an OpenAI-compatible chat completion, streamed, with exact tokens.

A run that needs its model does not get the network for it. It calls the
`chat` tool; the supervisor makes the HTTP request, sends each streamed
delta to the run's subscribers as a `model.delta` event (fenced like the
run's own events: nothing of a superseded generation, nothing after the
revoke), reports the provider's token counts with ctx.report_usage (so a
`tokens` limit is exact, and crossing it stops the run), and returns the
whole text. The revoke cancels the handler at its next await, which closes
the HTTP stream: the provider sees the client go away and stops generating.

    from deadstop.supervisor import Supervisor
    from examples.model_tool import chat_tool

    with Supervisor() as sup:
        sup.register_tool("chat", chat_tool("https://api.example.com", api_key="..."))
        run = sup.start(agent, tools=["chat"], limits={"tokens": 50_000})

Inside the run: `egress.call("chat", messages=[{"role": "user", "content": "hi"}], model="m")`.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable


def chat_tool(base_url: str, api_key: str | None = None, *, timeout: float = 120.0) -> Callable[..., Awaitable[str]]:
    """An async tool handler for POST {base_url}/v1/chat/completions with stream=true."""
    import aiohttp

    async def chat(messages: list[dict[str, Any]], model: str, ctx: Any, max_tokens: int | None = None) -> str:
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        text: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.post(f"{base_url.rstrip('/')}/v1/chat/completions", json=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"the model endpoint answered {resp.status}: {(await resp.text())[:500]}")
                async for raw in resp.content:  # server-sent events, one `data: {...}` line each
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:"):].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    for choice in chunk.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            text.append(delta)
                            ctx.emit("model.delta", {"text": delta})
                    usage = chunk.get("usage")
                    if usage:
                        ctx.report_usage(prompt_tokens=usage.get("prompt_tokens", 0),
                                         completion_tokens=usage.get("completion_tokens", 0))
        return "".join(text)

    return chat
