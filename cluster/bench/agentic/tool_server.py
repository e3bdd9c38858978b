"""The benchmark's tool: a local HTTP server answering every POST after a fixed latency."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Tool(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        time.sleep(self.server.latency_s)
        reply = (f"Result {body.get('round', 0)} for task {body.get('task', 0)}: the city has a river, "
                 f"an old bridge and a market.").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


class _ToolServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # read when it starts listening: every task may call at once


def start_tool(latency_s: float) -> ThreadingHTTPServer:
    """A tool server on a free loopback port, serving on a daemon thread; .shutdown() stops it."""
    server = _ToolServer(("127.0.0.1", 0), _Tool)
    server.latency_s = latency_s
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
