"""HTTP latency/throughput of `/search/text` (mode=rerank vs mode=global) and a bounded load run.

    .venv/bin/python bench/bench_service.py --index DIR          # a prebuilt index (e.g. the 1M synthetic one)
    .venv/bin/python bench/bench_service.py --images 2000        # no index at hand: builds a small one here

Starts `service --index DIR` on 127.0.0.1 (a subprocess, as users run it), warms it, then with
`wrk` (Debian package `wrk`; the client costs little CPU next to the server on 2 cores):
  * concurrency 1, 20 s per mode: p50 / p99 latency;
  * concurrency 8, 3 runs of 20 s per mode: requests/s (median run);
  * a bounded run of 10,000 re-rank requests at concurrency 32: error count and server RSS
    before/after.
k=10 results from K=100 candidates. Results go to the "Service: HTTP latency" section of
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service_common import Served, rss_mib, tiny_index, write_section  # noqa: E402

FALLBACK_QUERIES = ["a dog runs on the beach", "two children play in the snow", "a man rides a bike", "a black cat sits",
           "people walk down a busy street", "a girl in a red dress", "a brown dog jumps over a fence",
           "a boy swims in the pool", "a woman holds an umbrella", "climbers on a rocky mountain"]


def load_queries(n: int = 500) -> list[str]:
    """Distinct real captions (Flickr8k test) when the data is there, so no two requests in a
    row are alike; plain-character ones only, since wrk's Lua splices them into JSON."""
    import re

    pairs = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "pairs.jsonl"
    if not pairs.is_file():
        return FALLBACK_QUERIES
    ok = re.compile(r"^[A-Za-z0-9 ,.'-]+$")
    out: list[str] = []
    for line in pairs.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "test":
            out += [c.strip() for c in row["captions"] if ok.match(c.strip())]
    seen = list(dict.fromkeys(out))
    return seen[:n] or FALLBACK_QUERIES


QUERIES = load_queries()

LUA = r"""
local queries = {%(queries)s}
local mode = "%(mode)s"
local limit = %(limit)d
local counter = 0
request = function()
  local q = queries[math.random(#queries)]
  local body = '{"query": "' .. q .. '", "k": 10, "candidates": %(k)d, "mode": "' .. mode .. '"}'
  return wrk.format("POST", "/search/text", {["Content-Type"] = "application/json"}, body)
end
response = function(status, headers, body)
  counter = counter + 1
  if limit > 0 and counter >= limit then wrk.thread:stop() end
end
done = function(summary, latency, requests)
  io.write(string.format('RESULT {"p50_us": %%f, "p99_us": %%f, "requests": %%d, "duration_us": %%d, ' ..
    '"status_errors": %%d, "connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}\n',
    latency:percentile(50), latency:percentile(99), summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
"""


def wrk(url: str, mode: str, conns: int, seconds: int, limit_per_thread: int = 0, k: int = 100,
        threads: int = 1) -> dict:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(LUA % {"queries": ", ".join(json.dumps(q) for q in QUERIES), "mode": mode,
                             "limit": limit_per_thread, "k": k})
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--timeout", "30s", "-s", str(script),
           url + "/search/text"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result:\n{out}")
    r = json.loads(line[len("RESULT "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["status_errors"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return r


def bounded(url: str, total: int, conns: int, rounds: int = 1, between=None) -> dict:
    """Exactly `total` re-rank requests over `conns` keep-alive connections (wrk runs by time only),
    in `rounds` equal rounds with `between()` called after each (its values come back as "between")."""
    import asyncio

    import httpx

    async def run() -> dict:
        codes: dict[str, int] = {}
        lat: list[float] = []

        async def worker(c: httpx.AsyncClient) -> None:
            for i in left:  # the current round's shared iterator
                t0 = time.perf_counter()
                try:
                    r = await c.post(url + "/search/text", json={"query": QUERIES[i % len(QUERIES)], "k": 10,
                                                                 "candidates": 100, "mode": "rerank"})
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                lat.append(time.perf_counter() - t0)
                codes[key] = codes.get(key, 0) + 1

        limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
        t0 = time.perf_counter()
        after: list = []
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            for r in range(rounds):
                left = iter(range(r * total // rounds, (r + 1) * total // rounds))
                await asyncio.gather(*(worker(c) for _ in range(conns)))
                if between is not None:
                    after.append(between())
        took = time.perf_counter() - t0
        lat.sort()
        return {"requests": len(lat), "seconds": took, "rps": len(lat) / took, "codes": codes,
                "errors": sum(v for k, v in codes.items() if k != "200"), "between": after,
                "p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3}

    return asyncio.run(run())


def _rps(r: dict) -> str:
    """Median of the repeated runs, with all of them (the c=8 cells and the run's p50/p99 are the median run's)."""
    runs = r.get("rps_runs") or [r["rps"]]
    return f"{r['rps']:.0f} ({', '.join(f'{x:.0f}' for x in runs)})" if len(runs) > 1 else f"{r['rps']:.0f}"


def warm(url: str, n: int = 20) -> None:
    """Every query once (re-rank, 8 at a time), so the token-store pages the measured requests
    touch are in the page cache and each worker has faulted them in: a measurement after a build
    or a reboot is otherwise partly a disk benchmark. Then `n` of each mode one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=8)) as c:
        def one(q: str, mode: str = "rerank") -> None:
            c.post(url + "/search/text", json={"query": q, "k": 10, "candidates": 100, "mode": mode}).raise_for_status()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, QUERIES))
        for i in range(n):
            for mode in ("rerank", "global"):
                one(QUERIES[i % len(QUERIES)], mode)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--index", type=Path, help="index to serve (default: build a small one with --images)")
    p.add_argument("--synthetic", type=int, help="build an N-image synthetic index with the indexer's "
                   "bench/bench_indexer_1m.py (real model, vectors around real Flickr8k embeddings) and serve it")
    p.add_argument("--workdir", type=Path, help="where --synthetic builds (reused when the index is already there)")
    p.add_argument("--images", type=int, default=2000, help="images in the fallback index built here")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="concurrency-8 runs per mode; the median is reported")
    p.add_argument("--load-requests", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=1, help="server processes (service --workers)")
    p.add_argument("--search-threads", type=int, default=8)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--faiss-threads", type=int, default=1)
    p.add_argument("--text-runtime", default="onnx", choices=["torch", "onnx", "onnx-int8"])
    p.add_argument("--encode-batch", type=int, default=16, help="text queries coalesced per encoder pass")
    p.add_argument("--skip-latency", action="store_true", help="only the bounded load run")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("bench_service: needs `wrk` (apt-get install wrk)", file=sys.stderr)
        return 2
    note = ""
    index = args.index
    if index is None and args.synthetic:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="svc-bench-syn-"))
        index = work / "index1m"  # the indexer bench's output name, whatever N is
        if not (index / "manifest.json").is_file():
            # the indexer's script writes its own BENCHMARKS.md section; a side build here must not replace it
            from bench_service_common import BENCHMARKS

            saved = BENCHMARKS.read_text() if BENCHMARKS.exists() else None
            try:
                subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "bench_indexer_1m.py"), "--n",
                                str(args.synthetic), "--workdir", str(work), "--keep", "--real", "64"], check=True)
            finally:
                if saved is not None:
                    BENCHMARKS.write_text(saved)
        if args.synthetic < 1_000_000:
            note = (f"**Index: {args.synthetic:,} synthetic images (the indexer's 1M builder run with --n "
                    f"{args.synthetic}), not 1M: time ran out for a 1M build on the shared 2 cores.**")
    if index is None:
        tmp = Path(tempfile.mkdtemp(prefix="svc-bench-"))
        print(f"building a {args.images}-image index with random tiny backbones in {tmp} ...", file=sys.stderr)
        index = tiny_index(tmp, n_images=args.images)
        note = (f"**Index: {args.images} images built here with random *tiny* backbones (dim 32, 4x4 grid) — NOT the "
                "1M-image synthetic index; encode cost is far below the real text encoder's.**")
    env = {"SERVICE_SEARCH_THREADS": str(args.search_threads), "SERVICE_TORCH_THREADS": str(args.torch_threads),
           "SERVICE_FAISS_THREADS": str(args.faiss_threads), "SERVICE_TEXT_RUNTIME": args.text_runtime,
           "SERVICE_ENCODE_BATCH": str(args.encode_batch), "SERVICE_WORKERS": str(args.workers)}
    results: dict[str, dict] = {}
    load_avg = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    with Served(index, env=env) as s:
        t0 = time.time()
        ready = s.wait_ready()
        load_s = time.time() - t0
        info = ready.get("info") or {}
        warm(s.url)
        if not args.skip_latency:
            for mode in ("rerank", "global"):
                results[f"{mode}-c1"] = wrk(s.url, mode, 1, args.seconds)
                runs = sorted((wrk(s.url, mode, 8, args.seconds, threads=2) for _ in range(args.repeats)),
                              key=lambda r: r["rps"])
                results[f"{mode}-c8"] = {**runs[len(runs) // 2], "rps_runs": [r["rps"] for r in runs]}
                print(mode, results[f"{mode}-c1"], results[f"{mode}-c8"], file=sys.stderr)
        load, rss_before, rss_after = None, float("nan"), float("nan")
        anon_before, anon_after = float("nan"), float("nan")
        if args.load_requests > 0:
            rss_before, anon_before = rss_mib(s.proc.pid), rss_mib(s.proc.pid, "RssAnon")
            # heap after each of 5 rounds: growth that stops after the first round is warm-up
            # (per-thread buffers, allocator arenas); growth in every round would be a leak
            load = bounded(s.url, args.load_requests, 32, rounds=5, between=lambda: rss_mib(s.proc.pid, "RssAnon"))
            rss_after, anon_after = rss_mib(s.proc.pid), rss_mib(s.proc.pid, "RssAnon")
        print("load", load, rss_before, rss_after, file=sys.stderr)
        import httpx

        metrics = httpx.get(s.url + "/metrics").text
    errors_5xx = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith("service_errors_total") and 'status="5' in line)
    faiss = info.get("faiss", {}).get("image", {})
    how = " ".join(sys.argv[1:])
    table = ""
    if results:
        r1, g1, r8, g8 = (results[k] for k in ("rerank-c1", "global-c1", "rerank-c8", "global-c8"))
        table = f"""| /search/text | p50 ms (c=1) | p99 ms (c=1) | req/s (c=8) | p50 ms (c=8) | p99 ms (c=8) |
|---|---|---|---|---|---|
| mode=rerank (K=100) | {r1['p50_us'] / 1e3:.2f} | {r1['p99_us'] / 1e3:.2f} | {_rps(r8)} | {r8['p50_us'] / 1e3:.2f} | {r8['p99_us'] / 1e3:.2f} |
| mode=global | {g1['p50_us'] / 1e3:.2f} | {g1['p99_us'] / 1e3:.2f} | {_rps(g8)} | {g8['p50_us'] / 1e3:.2f} | {g8['p99_us'] / 1e3:.2f} |
| ratio rerank/global | {r1['p50_us'] / g1['p50_us']:.2f} | {r1['p99_us'] / g1['p99_us']:.2f} | {r8['rps'] / g8['rps']:.2f} | | |

"""
    load_text = "(no bounded load run)"
    if load is not None:
        load_text = f"""Bounded load run (mode=rerank, concurrency 32, Python httpx async client): {load['requests']} requests in
{load['seconds']:.1f} s ({load['rps']:.0f} req/s, client-side p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms);
errors: {load['errors']} (status codes {load['codes']}); server 5xx over the whole run (from /metrics):
{errors_5xx:.0f}; server anonymous memory (RssAnon: heap, the figure a leak grows) {anon_before:.0f} MiB before ->
{anon_after:.0f} MiB after ({anon_after - anon_before:+.0f} MiB; after each fifth of the run:
{' -> '.join(f'{v:.0f}' for v in load['between'])} MiB); VmRSS {rss_before:.0f} -> {rss_after:.0f} MiB (includes the
memory-mapped token store's pages touched by {len(QUERIES)} distinct queries: page cache, not heap)."""
    body = f"""Command: `.venv/bin/python bench/bench_service.py {how}` (client: `wrk`, same machine, loopback; server: `service --index`, workers={args.workers},
search_threads={args.search_threads}, torch_threads={args.torch_threads}, faiss_threads={args.faiss_threads},
text_runtime={args.text_runtime}, encode_batch={args.encode_batch}; {len(QUERIES)} distinct queries
({'Flickr8k test captions' if QUERIES is not FALLBACK_QUERIES else 'fixed list'}), drawn at random per request;
k=10 results from K=100 candidates; warm; {args.seconds} s per cell; the c=8 cells: median of {args.repeats} runs).

{note}

Index: {info.get('images')} images, {info.get('captions')} captions, dim {info.get('dim')}, grid {info.get('grid')},
tokens {info.get('token_form')}, FAISS image index `{faiss.get('factory', '?')}` nprobe {faiss.get('nprobe')}, model
`{(info.get('model') or {}).get('text_backbone')}` text backbone; load + warm-up {load_s:.1f} s.

{table}Targets (issue 4): rerank p50 <= 15 ms, p99 <= 40 ms at c=1; >= 150 req/s at c=8.

{load_text}

Machine load while measuring: load average {load_avg} at the start (1, 5, 15 min; this machine has 2 cores,
so anything above ~2 means other work shared them: absolute latencies are then pessimistic, compare the ratios).
"""
    print(body)
    if not args.no_write:
        title = "Service: bounded load run" if args.skip_latency else "Service: HTTP latency"
        if args.text_runtime != "onnx":
            title += f" (text_runtime={args.text_runtime})"
        if args.workers != 1:
            title += f" (workers={args.workers})"
        write_section(title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
