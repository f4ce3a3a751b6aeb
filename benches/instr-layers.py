#!/usr/bin/env python3
"""Where the dispatcher's instructions go per request, by layer (benches/instr).

Reads two callgrind profiles of the dispatcher (written with
--compress-strings=no --compress-pos=no), one at a low and one at a high
request rate, and prints the per-request difference:

* self cost: every function's own instructions, grouped by the crate or
  module its symbol belongs to (these add up to the whole);
* inclusive cost of each of our components and of the libraries we call,
  counted where the call enters the group from outside it (so recursion and
  calls inside the group are not counted twice; a group's figure includes
  what it calls in other groups, so these do not add up).

usage: instr-layers.py OK_LOW PROFILE_LOW OK_HIGH PROFILE_HIGH \
                       [RELAY_OK_LOW RELAY_LOW RELAY_OK_HIGH RELAY_HIGH]
With the h2 relay's two profiles too, the self cost table has a column for
the relay and one for what the dispatcher spends beyond it.
"""
import collections
import re
import sys

# Self cost: the first matching prefix of the symbol (after any leading "<"
# of a trait impl) names the layer.
SELF_LAYERS = [
    (("malloc", "free", "realloc", "calloc", "_int_malloc", "_int_free", "_int_realloc",
      "malloc_consolidate", "unlink_chunk", "tcache", "__libc_malloc", "__libc_free",
      "__libc_realloc", "__rust_alloc", "__rust_dealloc", "__rust_realloc", "__rdl_",
      "alloc::alloc::", "alloc::raw_vec::"), "allocator (malloc, free, raw vectors)"),
    (("__memcpy", "__memmove", "__memset", "memcpy", "memmove", "memset", "__memcmp",
      "memcmp", "__strlen", "__mem"), "libc: memcpy, memmove, memset, memcmp"),
    (("prost::", "dispatcher::pb::", "tonic_prost::", "prost_types::"),
     "prost: protobuf encode/decode"),
    (("h2::",), "h2: HTTP/2 frames, HPACK, streams"),
    (("hyper::", "hyper_util::", "http::", "http_body", "httparse"), "hyper, http"),
    (("tonic::", "tonic_"), "tonic: gRPC server, client, codec"),
    (("tower::", "tower_", "axum::", "matchit::"), "tower layers, axum router"),
    (("tokio::", "mio::", "tokio_util::", "tokio_stream::"), "tokio: scheduler, I/O, timers"),
    (("tracing_opentelemetry::", "opentelemetry"), "opentelemetry"),
    (("tracing::", "tracing_core::", "tracing_subscriber::", "tracing_log::"),
     "tracing and spans"),
    (("metrics::", "metrics_exporter_prometheus::", "metrics_util::",
      "dispatcher::metrics::", "dispatcher::dispatch::observe::"), "metrics"),
    (("governor::", "dispatcher::dispatch::auth::", "dispatcher::dispatch::rates::",
      "dispatcher::dispatch::front_door::", "sha2::", "subtle::"),
     "auth, tenant rates, front door"),
    (("dispatcher::dispatch::validate::", "dispatcher::dispatch::prepare::"),
     "request checks and estimate"),
    (("dispatcher::core::", "dispatcher::dispatch::desk::", "dispatcher::dispatch::lease::",
      "dispatcher::dispatch::queue::", "dispatcher::dispatch::capacity::"),
     "engine: decision, quota, settlement"),
    (("dispatcher::dispatch::", "dispatcher::forward", "dispatcher::server::",
      "dispatcher::grpc", "dispatcher::accept", "dispatcher::excerpt"),
     "dispatcher: forwarding, server, other"),
    (("dispatcher::jobs::",), "jobs"),
    (("dispatcher::",), "dispatcher: other modules"),
    (("hashbrown::", "dashmap::", "core::hash", "std::hash", "<std::hash"), "hashing, hash maps"),
    (("core::fmt", "alloc::fmt", "alloc::string", "<alloc::string"), "formatting, strings"),
    (("bytes::",), "bytes"),
    (("parking_lot", "std::sync", "core::sync", "std::sys::sync", "crossbeam", "arc_swap::"),
     "locks, atomics, channels"),
    (("clock_gettime", "__vdso", "__clock_gettime", "std::time", "std::sys::pal::unix::time"),
     "clock"),
    (("syscall", "epoll", "__GI___", "__libc_", "send", "recv", "write", "read", "pthread",
      "__lll", "futex", "__futex", "_dl_", "__tls"), "libc: syscall stubs, threads"),
]
# Inclusive cost on entry into each group (first matching group of the callee;
# counted only on calls from a function outside that group).
ENTRY_GROUPS = [
    ("prost: encode/decode", ("prost::", "dispatcher::pb::", "tonic_prost::")),
    ("tracing and spans", ("tracing::", "tracing_core::", "tracing_subscriber::",
                           "tracing_opentelemetry::")),
    ("metrics", ("metrics::", "metrics_exporter_prometheus::", "metrics_util::",
                 "dispatcher::metrics::", "dispatcher::dispatch::observe::")),
    ("auth and tenant rates", ("dispatcher::dispatch::auth::", "dispatcher::dispatch::rates::",
                               "governor::")),
    ("front door (auth, checks, estimate, snapshot)", ("dispatcher::dispatch::front_door::",)),
    ("quota desk: decision and reservation", ("dispatcher::dispatch::desk::",)),
    ("settlement (lease)", ("dispatcher::dispatch::lease::",)),
    ("forwarder (client call to the region)", ("dispatcher::dispatch::forwarder::",
                                               "dispatcher::forward::")),
    ("Dispatcher service (whole request)", ("dispatcher::server::dispatcher::",)),
    ("jobs", ("dispatcher::jobs::",)),
    ("allocator", ("malloc", "free", "realloc", "calloc", "__rust_alloc", "__rust_dealloc",
                   "__rust_realloc")),
]


def strip(sym):
    return sym.lstrip("<&*( ").replace("dyn ", "")


def layer_of(sym):
    s = strip(sym)
    for prefixes, name in SELF_LAYERS:
        if s.startswith(prefixes):
            return name
    if s.startswith(("core::", "alloc::", "std::")):
        return "std, core, alloc (other)"
    return "other (libc, other crates)"


def entry_group(sym):
    s = strip(sym)
    for name, prefixes in ENTRY_GROUPS:
        if s.startswith(prefixes) or (name == "allocator" and s in prefixes):
            return name
    return None


def read(path):
    """Self cost per function and inclusive cost per call edge."""
    own, calls = collections.Counter(), collections.Counter()
    fn = cfn = None
    pending = False
    with open(path) as f:
        for line in f:
            if line.startswith("fn="):
                fn = line[3:].strip()
            elif line.startswith("cfn="):
                cfn = line[4:].strip()
            elif line.startswith("calls="):
                pending = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) < 2:
                    continue
                cost = int(parts[1])
                if pending:
                    calls[(fn, cfn)] += cost
                    pending = False
                else:
                    own[fn] += cost
    return own, calls


def self_by_layer(ok_lo, path_lo, ok_hi, path_hi):
    """Per-request self cost by layer, and the raw profiles."""
    n = int(ok_hi) - int(ok_lo)
    (own_lo, calls_lo), (own_hi, calls_hi) = read(path_lo), read(path_hi)
    layers = collections.Counter()
    for fn in set(own_lo) | set(own_hi):
        layers[layer_of(fn)] += (own_hi[fn] - own_lo[fn]) / n
    return n, layers, (own_lo, calls_lo, own_hi, calls_hi)


def main():
    n, layers, (own_lo, calls_lo, own_hi, calls_hi) = self_by_layer(*sys.argv[1:5])
    relay = self_by_layer(*sys.argv[5:9])[1] if len(sys.argv) >= 9 else None
    total = sum(layers.values())
    print(f"   where the dispatcher's instructions go, per request (callgrind, {n} requests apart)")
    print("   self cost by layer (adds up to the whole):")
    if relay is None:
        for name, cost in layers.most_common():
            print(f"   {cost:10.0f}  {100 * cost / total:5.1f} %  {name}")
        print(f"   {total:10.0f}  100.0 %  all")
    else:
        print(f"   {'dispatcher':>10} {'h2-relay':>9} {'beyond':>8}")
        for name, cost in layers.most_common():
            print(f"   {cost:10.0f} {relay[name]:9.0f} {cost - relay[name]:8.0f}  {name}")
        rt = sum(relay.values())
        print(f"   {total:10.0f} {rt:9.0f} {total - rt:8.0f}  all")

    entries = collections.Counter()
    for edge in set(calls_lo) | set(calls_hi):
        caller, callee = edge
        group = entry_group(callee)
        if group and entry_group(caller) != group:
            entries[group] += calls_hi[edge] - calls_lo[edge]
    print("   inclusive cost on entering each part from outside it (overlapping):")
    for name, _ in ENTRY_GROUPS:
        print(f"   {entries[name] / n:10.0f}  {name}")

    top = collections.Counter({fn: own_hi[fn] - own_lo[fn] for fn in own_hi})
    print("   the 15 costliest functions (self cost per request):")
    for fn, cost in top.most_common(15):
        print(f"   {cost / n:10.0f}  {fn[:140]}")


main()
