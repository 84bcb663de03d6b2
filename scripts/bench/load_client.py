#!/usr/bin/env python3
"""Load client over real sockets (keep-alive HTTP/1.1), separate from the measured process.

  load_client.py session BASE TOKEN                      -> prints a new session id
  load_client.py fill BASE TOKEN SESSION PAIRS           -> PAIRS x (submit, cancel), unmeasured
  load_client.py measure BASE TOKEN SESSION PAIRS        -> PAIRS x (submit, cancel), latency of each
"""
import http.client, json, sys, time, uuid, statistics
from urllib.parse import urlparse

def conn(base):
    u = urlparse(base)
    return http.client.HTTPConnection(u.hostname, u.port)

def post(c, token, path, body):
    c.request("POST", path, json.dumps(body), {"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        raise SystemExit(f"{path}: {r.status} {data[:300]!r}")
    return json.loads(data) if data else None

def pair(c, token, session):
    p = str(uuid.uuid4())
    t0 = time.perf_counter()
    post(c, token, f"/sessions/{session}/prompts", {"prompt_id": p, "text": "add a test for the login race please"})
    t1 = time.perf_counter()
    post(c, token, f"/sessions/{session}/prompts/{p}/cancel", {})
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]

cmd, base, token = sys.argv[1:4]
c = conn(base)
if cmd == "session":
    print(post(c, token, "/sessions", {"title": "bench", "repository_url": "https://git.example.invalid/app.git", "base_branch": "main"})["id"])
elif cmd == "fill":
    for _ in range(int(sys.argv[5])):
        pair(c, token, sys.argv[4])
elif cmd == "measure":
    subs, cans = [], []
    for _ in range(int(sys.argv[5])):
        s, k = pair(c, token, sys.argv[4])
        subs.append(s); cans.append(k)
    f = lambda xs: f"p50 {pct(xs, .5):.2f} ms  p90 {pct(xs, .9):.2f} ms  p99 {pct(xs, .99):.2f} ms  mean {statistics.mean(xs):.2f} ms"
    print(f"submit-prompt: {f(subs)}")
    print(f"cancel-prompt: {f(cans)}")
