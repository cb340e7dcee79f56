"""A gRPC server or client over grpcio, for the HTTP/2 tests (generic handlers: no generated code).

server PORT             serves /test.Svc/Unary (a request b"fail" aborts with NOT_FOUND) and
                        /test.Svc/Stream (three messages); prints {"port": PORT} when it listens
client PORT OK FAIL     makes OK good and FAIL failing unary calls and one server-streaming call
                        on one channel (one HTTP/2 connection); prints what came back as JSON
"""

from __future__ import annotations

import json
import sys
import time
from concurrent import futures
from typing import Any

import grpc


def _unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
    if req == b"fail":
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b"pong:" + req


def _stream(req: bytes, ctx: grpc.ServicerContext) -> Any:
    for i in range(3):
        yield b"item%d" % i


class Handlers(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method == "/test.Svc/Unary":
            return grpc.unary_unary_rpc_method_handler(_unary)
        if details.method == "/test.Svc/Stream":
            return grpc.unary_stream_rpc_method_handler(_stream)
        return None


def server(port: int) -> None:
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    s.add_generic_rpc_handlers((Handlers(),))
    s.add_insecure_port(f"127.0.0.1:{port}")
    s.start()
    print(json.dumps({"port": port}), flush=True)
    while True:
        time.sleep(3600)


def client(port: int, ok: int, fail: int) -> None:
    codes: dict[str, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary = ch.unary_unary("/test.Svc/Unary")
        for i in range(ok + fail):
            try:
                unary(b"fail" if i % (ok + fail) >= ok else b"x%d" % i, timeout=10)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
        items = list(ch.unary_stream("/test.Svc/Stream")(b"s", timeout=10))
    print(json.dumps({"codes": codes, "stream_items": len(items)}), flush=True)
    sys.stdin.read()  # the test closes stdin once it has read the counts


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
