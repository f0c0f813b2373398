"""Load and fault test for ``tokprune-serve`` in one command (a small asyncio HTTP client, stdlib only).

Phases (each recorded in ``OUT/loadtest.json`` and summarised in ``OUT/loadtest.md``):

1. **load**: start ``tokprune-serve DIR`` (or use ``--url``), send ``--requests`` distinct requests
   (prompt, seed, guidance, some negative prompts) from ``--concurrency`` clients; count failures
   and lost requests (no HTTP answer), throughput and latency percentiles.
2. **serial**: the same requests one at a time; every PNG from phase 1 must be byte-identical.
3. **fault** (``--fault-requests N``): N more requests; after ``--kill-after`` answers, SIGKILL the
   replica process that served the last one. Every request must end with an image or a clear error
   (status + message); the client retries a 5xx once (requests are seeded, so a retry is exact);
   then wait until Ray has replaced the replica (a new pid answers, ``--replicas`` pids alive).
4. **restart**: stop the server and start it again on the same directory; one request must come
   back identical to its serial answer.

Example::

    python -m tokprune.serve.loadtest /tmp/shapes-64-s6 --requests 200 --concurrency 8 --replicas 2 \\
        --fault-requests 40 --out results/serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokprune.hashing import sha256_bytes

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "cross")
PLACES = ("in the top left", "in the center", "in the bottom right", "on the left")


@dataclass
class Outcome:
    index: int
    status: int | None = None  # None: no HTTP answer (lost)
    latency_ms: float = 0.0
    sha256: str | None = None
    pid: str | None = None
    error: str | None = None
    first_error: str | None = None  # the first attempt's error when a retry followed
    attempts: int = 0
    server_retries: int = 0  # the ingress re-ran the request because its replica died
    server_ms: dict[str, float] = field(default_factory=dict)


def make_requests(n: int, seed0: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct, deterministic requests over the shapes vocabulary."""
    out = []
    for i in range(n):
        prompt = f"a {COLOURS[i % 4]} {SHAPES[(i // 4) % 4]} {PLACES[(i // 16) % 4]}"
        body: dict[str, Any] = {"prompt": prompt, "seed": seed0 + i}
        if i % 5 == 0:
            body["negative_prompt"] = "a blurry image"
        if i % 3 == 0:
            body["guidance"] = 4.0
        out.append(body)
    return out


# ---- a tiny HTTP/1.1 client -----------------------------------------------------------------------
async def http(host: str, port: int, method: str, path: str, body: bytes = b"", timeout: float = 300.0
               ) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; raises OSError / asyncio.TimeoutError when no answer comes."""

    async def go() -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head + body)
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionError("the server closed the connection without an answer")
            status = int(status_line.split()[1])
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                data = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int((await reader.readline()).strip() or b"0", 16)
                    if size == 0:
                        break
                    data += await reader.readexactly(size)
                    await reader.readline()
            else:
                data = await reader.read()
            return status, headers, data
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


async def send(host: str, port: int, index: int, body: dict[str, Any], retries: int = 0) -> Outcome:
    out = Outcome(index=index)
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        out.attempts = attempt + 1
        try:
            status, headers, data = await http(host, port, "POST", "/generate", payload)
        except (OSError, asyncio.TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            out.status, out.error = None, f"no answer: {type(exc).__name__}: {exc}"
            if attempt < retries:
                out.first_error = out.error
            continue
        out.status = status
        if status == 200:
            out.sha256 = sha256_bytes(data)
            out.pid = headers.get("x-tokprune-pid")
            out.server_retries = int(headers.get("x-tokprune-retries", "0") or 0)
            out.server_ms = {k[len("x-tokprune-"):-3]: float(v) for k, v in headers.items()
                             if k.startswith("x-tokprune-") and k.endswith("-ms")}
            out.error = None
            break
        try:
            out.error = f"{status}: {json.loads(data)['message']}"
        except (ValueError, KeyError, TypeError):
            out.error = f"{status}: {data[:300].decode('utf-8', 'replace')}"
        if status < 500:
            break
        if attempt < retries:
            out.first_error = out.error
    out.latency_ms = 1000 * (time.perf_counter() - t0)
    return out


async def run_load(host: str, port: int, bodies: Sequence[dict], concurrency: int, retries: int = 0,
                   on_answer: Any = None) -> tuple[list[Outcome], float]:
    """Send every body with ``concurrency`` clients; returns outcomes (in request order) and wall seconds."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    results: list[Outcome | None] = [None] * len(bodies)

    async def client() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results[i] = await send(host, port, i, bodies[i], retries)
            if on_answer is not None:
                on_answer(results[i])

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return [r for r in results if r is not None], time.perf_counter() - t0


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    xs = sorted(values)

    def pct(p: float) -> float:  # nearest-rank
        k = max(0, min(len(xs) - 1, math.ceil(p / 100 * len(xs)) - 1))
        return round(xs[k], 1)

    return {"p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": round(statistics.fmean(xs), 1),
            "max": round(xs[-1], 1)}


# ---- the server process ------------------------------------------------------------------------------
class Server:
    """``tokprune-serve`` as a child process (its own single-node Ray)."""

    def __init__(self, directory: Path, port: int, extra: Sequence[str], log: Path) -> None:
        self.cmd = [sys.executable, "-m", "tokprune.serve.cli", str(directory), "--port", str(port), *extra]
        self.port = port
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> float:
        t0 = time.perf_counter()
        fh = open(self.log, "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tokprune-serve exited with {self.proc.returncode}; see {self.log}")
            try:
                status, _, _ = asyncio.run(http("127.0.0.1", self.port, "GET", "/readyz", timeout=5))
                if status == 200:
                    return time.perf_counter() - t0
            except (OSError, asyncio.TimeoutError, ValueError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"tokprune-serve not ready after {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


async def live_pids(host: str, port: int, probes: int = 12) -> set[str]:
    pids = set()
    for _ in range(probes):
        try:
            status, _, data = await http(host, port, "GET", "/healthz", timeout=5)
            if status == 200:
                pids.add(str(json.loads(data)["pid"]))
        except (OSError, asyncio.TimeoutError, ValueError):
            pass
    return pids


# ---- main ---------------------------------------------------------------------------------------------
def summarize(outcomes: Sequence[Outcome], seconds: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    return {
        "requests": len(outcomes), "ok": len(ok), "failed_with_error": sum(1 for o in outcomes if o.status not in (200, None)),
        "lost": sum(1 for o in outcomes if o.status is None), "retried": sum(1 for o in outcomes if o.attempts > 1),
        "retried_by_server": sum(o.server_retries for o in outcomes),
        "wall_s": round(seconds, 2), "throughput_rps": round(len(ok) / seconds, 3) if seconds else 0.0,
        "latency_ms": percentiles([o.latency_ms for o in ok]),
        "server_generate_ms": percentiles([o.server_ms.get("generate", 0.0) for o in ok]),
        "server_queue_ms": percentiles([o.server_ms.get("queue", 0.0) for o in ok]),
        "pids": sorted({o.pid for o in ok if o.pid}),
    }


def machine_state() -> dict[str, Any]:
    """CPU count, load average and the busiest processes (other people's jobs share this machine)."""
    from tokprune.environment import machine, versions

    return {**machine(busiest=5), "python": versions()["python"]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokprune.serve.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path, help="the export directory to serve")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--fault-requests", type=int, default=0, help="requests of the fault phase (0: skip it)")
    p.add_argument("--kill-after", type=int, default=10, help="answers of the fault phase before the kill")
    p.add_argument("--serve-args", default="--threads 1", help="extra tokprune-serve arguments")
    p.add_argument("--out", type=Path, default=Path("results/serve"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    host, port = "127.0.0.1", args.port
    log = args.out / "server.log"
    log.write_bytes(b"")
    extra = ["--replicas", str(args.replicas), *args.serve_args.split()]
    server = Server(args.directory.resolve(), port, extra, log)
    report: dict[str, Any] = {"command": " ".join(["python -m tokprune.serve.loadtest", *(argv or sys.argv[1:])]),
                              "server_command": " ".join(["tokprune-serve", *server.cmd[3:]]),
                              "machine_before": machine_state()}
    try:
        manifest = json.loads((args.directory / "manifest.json").read_text())
        report["export_command"] = manifest.get("command")
        report["export"] = {k: manifest.get(k) for k in ("height", "width", "steps", "guidance", "budget", "step_buckets")}
    except (OSError, ValueError):
        pass
    t_all = time.perf_counter()
    try:
        report["startup_s"] = round(server.start(), 1)
        bodies = make_requests(args.requests)
        print(f"load: {len(bodies)} requests, {args.concurrency} clients ...", flush=True)
        outcomes, secs = asyncio.run(run_load(host, port, bodies, args.concurrency))
        report["load"] = summarize(outcomes, secs)
        print(json.dumps(report["load"]), flush=True)

        print("serial: the same requests one at a time ...", flush=True)
        serial, ssecs = asyncio.run(run_load(host, port, bodies, 1))
        report["serial"] = summarize(serial, ssecs)
        mismatched = [o.index for o, s in zip(outcomes, serial) if o.sha256 is None or o.sha256 != s.sha256]
        report["identical_to_serial"] = {"compared": len(serial), "mismatched": mismatched}
        print(json.dumps(report["identical_to_serial"]), flush=True)

        if args.fault_requests:
            fault_bodies = make_requests(args.fault_requests, seed0=10_000)
            state: dict[str, Any] = {"answers": 0, "killed": None}

            def on_answer(o: Outcome) -> None:
                state["answers"] += 1
                if state["killed"] is None and state["answers"] >= args.kill_after and o.pid:
                    os.kill(int(o.pid), signal.SIGKILL)
                    state["killed"] = o.pid
                    state["killed_at_s"] = round(time.perf_counter() - t_fault, 2)
                    print(f"fault: killed replica pid {o.pid}", flush=True)

            t_fault = time.perf_counter()
            fouts, fsecs = asyncio.run(run_load(host, port, fault_bodies, args.concurrency, retries=1, on_answer=on_answer))
            fault = summarize(fouts, fsecs)
            fault["killed_pid"] = state["killed"]
            fault["killed_at_s"] = state.get("killed_at_s")
            fault["errors"] = [{"index": o.index, "attempts": o.attempts, "first_error": o.first_error, "final_status": o.status,
                                "error": o.error} for o in fouts if o.error or o.first_error]
            fault["first_attempt_errors"] = sum(1 for o in fouts if o.attempts > 1)
            t_rec = time.perf_counter()
            pids: set[str] = set()
            while time.perf_counter() - t_rec < 180:
                pids = asyncio.run(live_pids(host, port)) - {str(state["killed"])}
                if len(pids) >= args.replicas:
                    break
                time.sleep(2.0)
            fault["live_pids_after"] = sorted(pids)
            fault["replaced"] = len(pids) >= args.replicas
            fault["recovery_wait_s"] = round(time.perf_counter() - t_rec, 1)
            report["fault"] = fault
            print(json.dumps({k: v for k, v in fault.items() if k != "errors"}), flush=True)

        print("restart: stop, start again on the same directory ...", flush=True)
        server.stop()
        report["restart_startup_s"] = round(server.start(), 1)
        again = asyncio.run(send(host, port, 0, bodies[0]))
        report["restart"] = {"status": again.status, "identical": again.sha256 == serial[0].sha256, "error": again.error}
        print(json.dumps(report["restart"]), flush=True)
    finally:
        server.stop()
        report["total_wall_s"] = round(time.perf_counter() - t_all, 1)
        report["machine_after"] = machine_state()
        (args.out / "loadtest.json").write_text(json.dumps(report, indent=2) + "\n")
    _write_markdown(args.out / "loadtest.md", report)
    load = report["load"]
    ok = (load["failed_with_error"] == 0 and load["lost"] == 0 and not report["identical_to_serial"]["mismatched"]
          and report["restart"]["identical"]
          and ("fault" not in report or (report["fault"]["lost"] == 0 and report["fault"]["replaced"])))
    print(f"{'PASS' if ok else 'FAIL'}: see {args.out / 'loadtest.md'}")
    return 0 if ok else 1


def _write_markdown(path: Path, r: dict[str, Any]) -> None:
    load, lat = r["load"], r["load"]["latency_ms"]
    lines = [
        "# tokprune-serve load and fault test", "",
        f"Command: `{r['command']}`  ", f"Server: `{r['server_command']}`  ",
        f"Export: `{r.get('export_command')}` ({r.get('export')})  ", "",
        f"Machine before: {r['machine_before']['cpus']} CPUs, load average {r['machine_before']['load_average']}, "
        f"busiest processes: {r['machine_before']['busiest']}  ",
        f"Machine after: load average {r['machine_after']['load_average']}, busiest: {r['machine_after']['busiest']}  ",
        f"Total wall time: {r['total_wall_s']} s (server start {r['startup_s']} s)", "",
        "## Load", "",
        "| requests | clients | ok | failed | lost | wall | throughput | p50 | p95 | p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {load['requests']} | {r['command'].split('--concurrency')[-1].split()[0] if '--concurrency' in r['command'] else 8} "
        f"| {load['ok']} | {load['failed_with_error']} | {load['lost']} | {load['wall_s']} s | {load['throughput_rps']} img/s "
        f"| {lat.get('p50')} ms | {lat.get('p95')} ms | {lat.get('p99')} ms |", "",
        f"Server-side generate time per request (ms): {load['server_generate_ms']}; queue: {load['server_queue_ms']}; "
        f"replica pids: {load['pids']}", "",
        f"Serial (one at a time): {r['serial']['ok']}/{r['serial']['requests']} ok in {r['serial']['wall_s']} s, "
        f"p50 {r['serial']['latency_ms'].get('p50')} ms. Byte-identical PNGs to the concurrent run: "
        f"{r['identical_to_serial']['compared'] - len(r['identical_to_serial']['mismatched'])}/{r['identical_to_serial']['compared']}.",
        "",
    ]
    if "fault" in r:
        f = r["fault"]
        lines += [
            "## Fault: SIGKILL one replica during load", "",
            f"{f['requests']} requests, {f['ok']} ok, {f['failed_with_error']} failed with an error, {f['lost']} lost; "
            f"killed pid {f['killed_pid']} at {f['killed_at_s']} s; {f['retried_by_server']} requests in flight on the killed "
            f"replica were re-run by the ingress on another replica; {f['first_attempt_errors']} first attempts got an "
            f"error and were retried once by the client; replica replaced: {f['replaced']} "
            f"(live pids {f['live_pids_after']}, {f['recovery_wait_s']} s after the phase).", "",
        ]
        for e in f["errors"][:10]:
            lines.append(f"- request {e['index']}: first attempt `{e['first_error'] or e['error']}`; final status "
                         f"{e['final_status']} after {e['attempts']} attempt(s)")
        lines.append("")
    lines += ["## Restart", "", f"Restarted on the same directory in {r['restart_startup_s']} s; first request: "
              f"status {r['restart']['status']}, identical to its serial answer: {r['restart']['identical']}.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
