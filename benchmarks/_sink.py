"""A TCP sink in a process of its own: prints `open PEERPORT NS` and `closed PEERPORT NS` per connection.

    python benchmarks/_sink.py      # prints `port N` first
"""

import asyncio
import sys
import time


async def main() -> None:
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[1]
        print(f"open {peer} {time.monotonic_ns()}", flush=True)
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        print(f"closed {peer} {time.monotonic_ns()}", flush=True)
        writer.close()

    server = await asyncio.start_server(one, "127.0.0.1", 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
