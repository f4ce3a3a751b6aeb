#!/usr/bin/env python3
"""A small AgentCluster (proto/dispatch/v1/cluster.proto) in Python.

With OPENAI_BASE_URL set it runs each unit of work as a chat completion on
that OpenAI-compatible endpoint; without, it echoes the payload back, a
token at a time. Either way it does what the dispatcher relies on
(docs/CLUSTERS.md): usage as the provider counts it, a load report in every
reply, the provider's rate-limit headers relayed as provider_quota, a
provider refusal as RESOURCE_EXHAUSTED with RetryInfo, an unknown model as
NOT_FOUND, streaming with cumulative usage and a final `done` chunk, and
work that stops when its caller cancels or its deadline passes.

The gRPC stubs are generated from proto/ when it starts (grpcio-tools),
into a temporary directory: nothing generated is kept beside this file.
"""

import argparse
import http.client
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import urllib.parse
from concurrent import futures

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

HERE = os.path.dirname(os.path.abspath(__file__))
SERVICE = "dispatch.v1.AgentCluster"
# The longest request id echoed back (x-request-id).
ECHO_MAX_BYTES = 128


def load_stubs(proto_dir):
    """Generates the dispatch.v1 stubs into a temporary directory and imports them."""
    import grpc_tools
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="agent-cluster-stubs-")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out}",
            f"--grpc_python_out={out}", "dispatch/v1/cluster.proto"]
    if protoc.main(args) != 0:
        sys.exit(f"cluster.py: generating stubs from {proto_dir} failed")
    sys.path.insert(0, out)
    from dispatch.v1 import cluster_pb2, cluster_pb2_grpc
    return cluster_pb2, cluster_pb2_grpc


class Refused(Exception):
    """The work cannot run: a gRPC code, a message, and for a provider's
    refusal the time after which to retry."""

    def __init__(self, code, message, retry_after=None):
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


class Stopped(Exception):
    """The call ended (cancelled, or its deadline passed) while its work ran."""


def failed(call, e, code, what):
    """What a failed provider call means: our own stop, the deadline (the
    provider call's timeout is the time left), or `code`."""
    if call.stop.is_set():
        return Stopped()
    if isinstance(e, TimeoutError):
        return Refused(code_pb2.DEADLINE_EXCEEDED, f"the deadline passed waiting for the provider ({what})")
    return Refused(code, f"{what}: {e}")


def abort(context, refused):
    """Answers with the refusal; RetryInfo goes in the rich status details."""
    details = []
    if refused.retry_after is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(int(refused.retry_after * 1e9))
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
    status = status_pb2.Status(code=refused.code, message=refused.message[:512], details=details)
    context.abort_with_status(rpc_status.to_status(status))


class Load:
    """Calls running (in_flight) and waiting for a slot (queued); one lock."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.slots = threading.Semaphore(capacity)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.queued = 0

    def enter(self, stop):
        """Takes a slot, unless the call stops while it waits; True if taken."""
        with self.lock:
            self.queued += 1
        try:
            while not self.slots.acquire(timeout=0.05):
                if stop.is_set():
                    return False
        finally:
            with self.lock:
                self.queued -= 1
        with self.lock:
            self.in_flight += 1
        return True

    def leave(self):
        with self.lock:
            self.in_flight -= 1
        self.slots.release()

    def report(self, pb):
        # Taken while the call it answers still counts, as the contract says.
        with self.lock:
            return pb.LoadReport(in_flight=self.in_flight, queued=self.queued, capacity=self.capacity,
                                 utilization=min(1.0, self.in_flight / self.capacity))


class Call:
    """One call's stop signal: set when the call ends, is cancelled or its
    deadline passes (grpcio runs the callback then), and closes the
    provider connection so a blocked read returns at once."""

    def __init__(self, context):
        self.stop = threading.Event()
        self.upstream = None
        if not context.add_callback(self._stopped):
            self.stop.set()   # the call has already ended

    def _stopped(self):
        self.stop.set()
        conn = self.upstream
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def reset_seconds(value):
    """An OpenAI reset header ("1s", "6m0s", "20ms", "1h2m3.5s") in seconds."""
    total, found = 0.0, False
    for number, unit in re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)", value or ""):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        found = True
    return total if found else None


def provider_quota(pb, headers):
    """The provider's x-ratelimit-* headers, or None when it sent none (never zeros)."""
    try:
        tokens = int(headers["x-ratelimit-remaining-tokens"])
        requests = int(headers["x-ratelimit-remaining-requests"])
    except (KeyError, TypeError, ValueError):
        return None
    quota = pb.ProviderQuota(remaining_tokens=tokens, remaining_requests=requests)
    for field, header in (("reset_tokens", "x-ratelimit-reset-tokens"),
                          ("reset_requests", "x-ratelimit-reset-requests")):
        seconds = reset_seconds(headers.get(header))
        if seconds is not None:
            getattr(quota, field).FromNanoseconds(int(seconds * 1e9))
    return quota


def retry_after(headers):
    """When a refused request may be retried, from the provider's headers."""
    if headers.get("retry-after-ms"):
        return float(headers["retry-after-ms"]) / 1000
    if headers.get("retry-after"):
        return float(headers["retry-after"])
    return reset_seconds(headers.get("x-ratelimit-reset-tokens")) or 1.0


def refusal(status):
    """What a provider's error status means for the dispatcher."""
    if status == 404:
        return code_pb2.NOT_FOUND          # an unknown model: a bad request, not an outage
    if status in (400, 413, 422):
        return code_pb2.INVALID_ARGUMENT
    if status in (401, 403, 502, 503):
        return code_pb2.UNAVAILABLE        # our key or the provider: not run, try another region
    return code_pb2.INTERNAL               # it may have run


def error_message(response):
    """The message of a provider's error answer (its first 512 bytes)."""
    raw = response.read(512)
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")


class Provider:
    """An OpenAI-compatible chat completions endpoint."""

    def __init__(self, base_url, api_key):
        url = urllib.parse.urlparse(base_url)
        self.https = url.scheme == "https"
        self.host, self.path, self.key = url.netloc, url.path.rstrip("/") + "/chat/completions", api_key

    def open(self, call, request, stream, timeout):
        body = {"model": request.model,
                "messages": [{"role": "user", "content": request.payload.decode("utf-8", "replace")}],
                "stream": stream}
        if request.max_output_tokens:
            body["max_tokens"] = request.max_output_tokens
        if stream:
            body["stream_options"] = {"include_usage": True}
        headers = {"Content-Type": "application/json", "X-Client-Request-Id": request.request_id[:ECHO_MAX_BYTES]}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = kind(self.host, timeout=timeout)
        call.upstream = conn
        try:
            conn.request("POST", self.path, json.dumps(body), headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise failed(call, e, code_pb2.UNAVAILABLE, "provider")
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.status == 429:
            raise Refused(code_pb2.RESOURCE_EXHAUSTED, f"provider rate limit: {error_message(response)}",
                          retry_after(headers))
        if response.status != 200:
            raise Refused(refusal(response.status), f"provider {response.status}: {error_message(response)}")
        return response, headers


class AgentCluster:
    def __init__(self, pb, load, provider, models, ms_per_token):
        self.pb, self.load, self.provider = pb, load, provider
        self.models, self.pace = models, ms_per_token / 1000

    def _begin(self, request, context):
        """Checks the request, echoes what arrived, takes a slot."""
        rid = request.request_id
        echo = [("x-labels-received", str(len(request.labels)))]
        if len(rid.encode()) <= ECHO_MAX_BYTES and rid.isprintable() and rid.isascii():
            echo.append(("x-request-id", rid))
        context.send_initial_metadata(echo)
        if not request.model:
            abort(context, Refused(code_pb2.INVALID_ARGUMENT, "model is required"))
        if self.provider is None and request.model not in self.models:
            abort(context, Refused(code_pb2.NOT_FOUND, f"model {request.model[:64]!r} is not served here"))
        call = Call(context)
        if not self.load.enter(call.stop):
            abort(context, Refused(code_pb2.CANCELLED, "cancelled while queued"))
        return call

    def _timeout(self, context):
        remaining = context.time_remaining()
        return None if remaining is None else max(remaining, 0.001)

    def _echo_tokens(self, request):
        words = request.payload.decode("utf-8", "replace").split() or ["..."]
        return [words[i % len(words)] + " " for i in range(request.max_output_tokens)]

    def _prompt(self, request):
        # No provider: count as the dispatcher estimates (4 bytes a token).
        return max(1, math.ceil(len(request.payload) / 4))

    def Execute(self, request, context):
        call = self._begin(request, context)
        try:
            if self.provider is None:
                tokens = self._echo_tokens(request)
                if call.stop.wait(self.pace * len(tokens)):
                    return self.pb.ExecuteReply()   # cancelled or past the deadline: nobody reads it
                usage = self.pb.Usage(prompt_tokens=self._prompt(request), completion_tokens=len(tokens))
                return self.pb.ExecuteReply(output="".join(tokens).encode(), usage=usage,
                                            load=self.load.report(self.pb))
            try:
                response, headers = self.provider.open(call, request, False, self._timeout(context))
                body = json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise failed(call, e, code_pb2.INTERNAL, "provider answer")
            u = body.get("usage") or {}
            text = (body.get("choices") or [{}])[0].get("message", {}).get("content") or ""
            return self.pb.ExecuteReply(
                output=text.encode(),
                usage=self.pb.Usage(prompt_tokens=u.get("prompt_tokens", 0),
                                    completion_tokens=u.get("completion_tokens", 0)),
                provider_quota=provider_quota(self.pb, headers), load=self.load.report(self.pb))
        except Refused as r:
            abort(context, r)
        except Stopped:
            abort(context, self._stopped(context))
        finally:
            self.load.leave()

    def _stopped(self, context):
        """The answer for a call that ended while its work ran: grpcio has
        usually answered already, and must not be told anything else."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return Refused(code_pb2.DEADLINE_EXCEEDED, "the deadline passed")
        return Refused(code_pb2.CANCELLED, "cancelled")

    def ExecuteStream(self, request, context):
        call = self._begin(request, context)
        try:
            chunks = self._echo(request, call) if self.provider is None else self._relay(request, call, context)
            yield from chunks
        except Refused as r:
            abort(context, r)
        except Stopped:
            abort(context, self._stopped(context))
        finally:
            self.load.leave()

    def _echo(self, request, call):
        prompt, tokens = self._prompt(request), self._echo_tokens(request)
        for n, token in enumerate(tokens, 1):
            if call.stop.wait(self.pace):
                return
            yield self.pb.ExecuteChunk(output=token.encode(),
                                       usage=self.pb.Usage(prompt_tokens=prompt, completion_tokens=n))
        yield self.pb.ExecuteChunk(done=True, usage=self.pb.Usage(prompt_tokens=prompt,
                                                                  completion_tokens=len(tokens)),
                                   load=self.load.report(self.pb))

    def _relay(self, request, call, context):
        response, headers = self.provider.open(call, request, True, self._timeout(context))
        prompt, produced, final = request.prompt_tokens, 0, None
        try:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    final = event["usage"]
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        produced += 1   # about a token a delta; the provider's count comes last
                        yield self.pb.ExecuteChunk(output=text.encode(), usage=self.pb.Usage(
                            prompt_tokens=prompt, completion_tokens=produced))
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise failed(call, e, code_pb2.INTERNAL, "provider stream")
        if call.stop.is_set():
            return
        final = final or {}
        usage = self.pb.Usage(prompt_tokens=final.get("prompt_tokens", prompt),
                              completion_tokens=max(final.get("completion_tokens", produced), 0))
        yield self.pb.ExecuteChunk(done=True, usage=usage, provider_quota=provider_quota(self.pb, headers),
                                   load=self.load.report(self.pb))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:7100", help="host:port (port 0 picks one)")
    parser.add_argument("--proto", default=os.path.join(HERE, "..", "..", "proto"), help="the repository's proto/")
    parser.add_argument("--capacity", type=int, default=8, help="calls run at once; more wait in the queue")
    parser.add_argument("--models", default=os.environ.get("MODELS", "gpt-4o"),
                        help="comma-separated models served when echoing (with a provider: what it serves)")
    parser.add_argument("--echo-ms-per-token", type=float, default=10.0, help="the echo's pace")
    args = parser.parse_args()

    pb, pb_grpc = load_stubs(os.path.abspath(args.proto))
    base_url = os.environ.get("OPENAI_BASE_URL")
    provider = Provider(base_url, os.environ.get("OPENAI_API_KEY")) if base_url else None
    cluster = AgentCluster(pb, Load(args.capacity), provider, set(args.models.split(",")), args.echo_ms_per_token)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * args.capacity + 4))
    pb_grpc.add_AgentClusterServicer_to_server(cluster, server)
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port(args.listen)
    if port == 0:
        sys.exit(f"cluster.py: cannot listen on {args.listen}")
    server.start()
    for name in ("", SERVICE):
        checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = args.listen.rsplit(":", 1)[0]
    print(f"cluster: {'calling ' + base_url if provider else 'echoing (no OPENAI_BASE_URL)'}", file=sys.stderr)
    print(f"cluster listening on {host}:{port}", flush=True)

    def stop(*_):
        # Not serving first, so the dispatcher's health checks see it; then finish what runs.
        for name in ("", SERVICE):
            checks.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        server.stop(grace=5)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
