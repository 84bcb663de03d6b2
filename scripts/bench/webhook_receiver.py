#!/usr/bin/env python3
"""A webhook receiver in its own process for the delivery bench (scripts/bench/webhooks.sh).

Listens on 127.0.0.1:<port> (0: any; the port is printed first), answers every POST 200, and
prints one line per request: `<webhook-id> <received unix ms> <event recorded_at unix ms>`.
"""
import json
import sys
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        received = time.time() * 1000
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
        recorded = datetime.fromisoformat(json.loads(body)["recorded_at"].replace("Z", "+00:00"))
        sys.stdout.write(
            f"{self.headers['webhook-id']} {received:.3f} {recorded.timestamp() * 1000:.3f}\n"
        )
        sys.stdout.flush()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
