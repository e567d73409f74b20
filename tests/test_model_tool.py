"""The model call as a brokered tool (examples/model_tool.py), against an OpenAI-compatible streaming
server of the test's own on 127.0.0.1: deltas arrive as the run's events, tokens are counted exactly,
and a stop mid-stream closes the stream at the provider (which sees its client go away)."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import threading
import time

import pytest

import behaviours
from deadstop.supervisor import Supervisor

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("model_tool", os.path.join(HERE, "..", "examples", "model_tool.py"))
model_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model_tool)


class _Provider:
    """Streams `words` deltas, `pause` s apart, then a usage chunk; records how each stream ended."""

    def __init__(self, words: int, pause: float):
        self.words, self.pause = words, pause
        self.ended: list[tuple[str, int, int]] = []  # (how, deltas written, monotonic ns)
        self.finished = threading.Event()
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                written = 0
                try:
                    for i in range(provider.words):
                        self._chunk({"choices": [{"delta": {"content": f"w{i} "}}]})
                        written += 1
                        time.sleep(provider.pause)
                    self._chunk({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": provider.words}})
                    self._send(b"data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    provider.ended.append(("completed", written, time.monotonic_ns()))
                except (BrokenPipeError, ConnectionResetError):
                    provider.ended.append(("client went away", written, time.monotonic_ns()))
                finally:
                    provider.finished.set()

            def _chunk(self, obj: dict) -> None:
                self._send(b"data: " + json.dumps(obj).encode() + b"\n\n")

            def _send(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def provider(request):
    words, pause = request.param
    p = _Provider(words, pause)
    yield p
    p.close()


@pytest.mark.parametrize("provider", [(5, 0.0)], indirect=True)
def test_the_models_stream_arrives_as_events_and_its_tokens_are_counted(tmp_path, provider) -> None:
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        sup.register_tool("chat", model_tool.chat_tool(provider.url))
        events = sup.subscribe()
        run = sup.start(behaviours.asks_the_model, "hi", tools=["chat"])
        assert run.result(30) == "w0 w1 w2 w3 w4 "
        deltas = []
        for event in events:
            if event.run_id == run.id and event.kind == "model.delta":
                deltas.append(event.data["text"])
            if event.run_id == run.id and event.kind == "run.ended":
                break
        assert deltas == [f"w{i} " for i in range(5)]
        assert run.usage.tokens == 16  # 11 prompt + 5 completion, from the provider's own count
    assert provider.ended[0][0] == "completed"


@pytest.mark.parametrize("provider", [(10_000, 0.01)], indirect=True)
def test_a_stop_mid_stream_closes_the_stream_at_the_provider(tmp_path, provider) -> None:
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        sup.register_tool("chat", model_tool.chat_tool(provider.url))
        events = sup.subscribe()
        run = sup.start(behaviours.asks_the_model, "write forever", tools=["chat"], grace=0.2)
        late = []
        for event in events:
            if event.run_id == run.id and event.kind == "model.delta" and event.data["text"] == "w3 ":
                break  # the stream is flowing
        report = run.stop()
        assert report.handlers_cancelled == 1 and report.survivors == 0
        assert provider.finished.wait(30), "the provider never saw the stream end"
        for event in events:
            if event.run_id == run.id and event.kind == "model.delta" and event.t_ns > report.revoked_at:
                late.append(event)
            if event.run_id == run.id and event.kind == "run.ended":
                break
    how, written, _at = provider.ended[0]
    assert how == "client went away" and written < 10_000
    assert late == [], "a delta of the stopped run was delivered after its revoke"
