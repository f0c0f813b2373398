"""The load-test client's bookkeeping: distinct requests, nearest-rank percentiles, lost vs failed, a real HTTP exchange."""

from __future__ import annotations

import asyncio
import json

from tokprune.serve.loadtest import Outcome, make_requests, percentiles, send, summarize


def test_requests_are_distinct_and_deterministic():
    a = make_requests(200)
    assert a == make_requests(200) and len({json.dumps(b, sort_keys=True) for b in a}) == 200
    assert {b.get("guidance", 7.0) for b in a} == {4.0, 7.0} and any("negative_prompt" in b for b in a)


def test_percentiles_are_nearest_rank():
    p = percentiles([float(x) for x in range(1, 101)])
    assert (p["p50"], p["p95"], p["p99"], p["max"]) == (50.0, 95.0, 99.0, 100.0)


def test_summary_separates_lost_from_failed():
    outs = [Outcome(0, 200, 10.0, "h", "1"), Outcome(1, 422, 1.0, error="422: x"), Outcome(2, None, error="no answer")]
    s = summarize(outs, 2.0)
    assert (s["ok"], s["failed_with_error"], s["lost"], s["throughput_rps"]) == (1, 1, 1, 0.5)


def test_client_talks_http_and_retries_a_5xx_once():
    answers = iter([(503, b'{"message": "replica died"}'), (200, b"PNG")])

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        status, body = next(answers)
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nX-Tokprune-Pid: 9\r\n"
                     f"X-Tokprune-Generate-Ms: 5.0\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await send("127.0.0.1", port, 0, {"prompt": "a"}, retries=1)

    out = asyncio.run(main())
    assert (out.status, out.attempts, out.pid, out.first_error) == (200, 2, "9", "503: replica died")
    assert out.server_ms == {"generate": 5.0}
