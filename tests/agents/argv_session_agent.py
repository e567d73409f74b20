#!/usr/bin/env python3
"""An argv agent: reads its message with the `inbox` verb, answers with `result`."""

from deadstop.worker import egress

box = egress.inbox()
egress.report_result({"got": box["message"], "generation": box["context"]["generation"],
                      "session": box["context"]["session"]})
