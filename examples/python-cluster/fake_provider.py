#!/usr/bin/env python3
"""A stand-in OpenAI-compatible endpoint, to try cluster.py's provider path
without a key (and for the tests): POST /v1/chat/completions, streamed or
not, answering "1\\n2\\n3..." up to max_tokens at a fixed pace; a
tokens-per-minute and a requests-per-minute limit counted at admission
(prompt + max_tokens, as OpenAI does), told in x-ratelimit-* headers and
enforced with 429 and retry-after-ms; 404 for a model it does not serve.
Standard library only.
"""

import argparse
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Bucket:
    """A token bucket refilled continuously up to its per-minute limit."""

    def __init__(self, per_minute):
        self.limit, self.level, self.at = per_minute, float(per_minute), time.monotonic()

    def refill(self, now):
        self.level = min(self.limit, self.level + (now - self.at) * self.limit / 60)
        self.at = now

    def wait_for(self, n):
        """Seconds until n fit (0 if they do now)."""
        return max(0.0, (n - self.level) * 60 / self.limit)

    def reset(self):
        """Seconds until full."""
        return (self.limit - self.level) * 60 / self.limit


class Limits:
    def __init__(self, tpm, rpm):
        self.tokens, self.requests, self.lock = Bucket(tpm), Bucket(rpm), threading.Lock()

    def admit(self, need):
        """Takes need tokens and a request, or says how long until they fit."""
        with self.lock:
            now = time.monotonic()
            self.tokens.refill(now)
            self.requests.refill(now)
            wait = max(self.tokens.wait_for(need), self.requests.wait_for(1))
            if need > self.tokens.limit:
                wait = 60.0
            if wait == 0:
                self.tokens.level -= need
                self.requests.level -= 1
            return wait, self.headers()

    def headers(self):
        return {
            "x-ratelimit-limit-tokens": str(self.tokens.limit),
            "x-ratelimit-remaining-tokens": str(max(0, int(self.tokens.level))),
            "x-ratelimit-reset-tokens": f"{self.tokens.reset():.3f}s",
            "x-ratelimit-limit-requests": str(self.requests.limit),
            "x-ratelimit-remaining-requests": str(max(0, int(self.requests.level))),
            "x-ratelimit-reset-requests": f"{self.requests.reset():.3f}s",
        }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"   # the body ends when the connection closes

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.answer(404, {"error": {"message": f"no route {self.path}"}})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except ValueError:
            return self.answer(400, {"error": {"message": "not JSON"}})
        server = self.server
        if body.get("model") not in server.models:
            return self.answer(404, {"error": {"code": "model_not_found",
                                               "message": f"The model {body.get('model')!r} does not exist"}})
        text = "".join(m.get("content", "") for m in body.get("messages", []))
        prompt = max(1, math.ceil(len(text.encode()) / 4))
        max_tokens = int(body.get("max_tokens") or 256)
        wait, headers = server.limits.admit(prompt + max_tokens)
        if wait > 0:
            headers["retry-after-ms"] = str(int(wait * 1000))
            return self.answer(429, {"error": {"code": "rate_limit_exceeded",
                                               "message": f"Rate limit reached: {prompt + max_tokens} tokens asked"}},
                               headers)
        tokens = [f"{i}\n" for i in range(1, max_tokens + 1)]
        usage = {"prompt_tokens": prompt, "completion_tokens": len(tokens),
                 "total_tokens": prompt + len(tokens)}
        if not body.get("stream"):
            time.sleep(server.pace * len(tokens))
            return self.answer(200, {"choices": [{"index": 0, "finish_reason": "length",
                                                  "message": {"role": "assistant", "content": "".join(tokens)}}],
                                     "usage": usage}, headers)
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for token in tokens:
                time.sleep(server.pace)
                self.event({"choices": [{"index": 0, "delta": {"content": token}}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                self.event({"choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client went away: stop generating

    def event(self, data):
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8400", help="host:port (port 0 picks one)")
    parser.add_argument("--models", default="gpt-4o", help="comma-separated models served")
    parser.add_argument("--tokens-per-minute", type=int, default=30000)
    parser.add_argument("--requests-per-minute", type=int, default=500)
    parser.add_argument("--ms-per-token", type=float, default=5.0)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    server.models = set(args.models.split(","))
    server.limits = Limits(args.tokens_per_minute, args.requests_per_minute)
    server.pace = args.ms_per_token / 1000
    print(f"fake_provider listening on {host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
