"""Two commits' services side by side on one index: does a change move HTTP latency?

    .venv/bin/python bench/bench_service_ab.py --index DIR --base REV [--seconds 10] [--rounds 3]

Checks REV out into a temporary git worktree and serves DIR with `service --index` from that
checkout and from this one (same interpreter and packages, same settings), one after the
other, alternating for `--rounds` rounds, so drift on a shared machine hits both alike. Each
turn: `wrk` at concurrency 1 (p50 / p99 of `POST /search/text`, mode=rerank, k=10 of K=100)
and at concurrency 8 (req/s). Reports the median over rounds and this/base ratios; writes the
"Service: HTTP latency, side by side with REV" section of BENCHMARKS.md (unless --no-write).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import httpx  # noqa: E402

from bench_service import warm, wrk  # noqa: E402
from bench_service_common import free_port  # noqa: E402
from common import machine, side_by_side, write_section  # noqa: E402


def serve(checkout: Path, index: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "SERVICE_LOG_LEVEL": "warning", "PYTHONPATH": str(checkout), "SERVICE_TORCH_THREADS": "1",
           "SERVICE_FAISS_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--index", str(index), "--port", str(port)],
                            cwd=checkout, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"service from {checkout} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("service did not become ready")


def turn(checkout: Path, index: Path, seconds: int) -> dict:
    proc, url = serve(checkout, index)
    try:
        warm(url)
        c1 = wrk(url, "rerank", 1, seconds)
        c8 = wrk(url, "rerank", 8, seconds, threads=2)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"p50": c1["p50_us"] / 1e3, "p99": c1["p99_us"] / 1e3, "rps": c8["rps"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--base", required=True, help="the commit to compare with (e.g. the one before a change)")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    args.index = args.index.resolve()  # each service runs in its own checkout
    if shutil.which("wrk") is None:
        print("bench_service_ab: needs `wrk` (apt-get install wrk)", file=sys.stderr)
        return 2
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    runs = side_by_side(args.base, args.rounds, lambda checkout: turn(checkout, args.index, args.seconds))
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("p50", "p99", "rps")} for n, v in runs.items()}
    rows = [f"| {n} ({base if n == 'base' else head + ' + working tree'}) | {m['p50']:.2f} | {m['p99']:.2f} | "
            f"{m['rps']:.1f} |" for n, m in med.items()]
    ratio = {k: med["this"][k] / med["base"][k] for k in ("p50", "p99", "rps")}
    body = "\n".join([
        f"Machine: {machine()}; command: `.venv/bin/python bench/bench_service_ab.py --index {args.index} --base "
        f"{args.base} --seconds {args.seconds} --rounds {args.rounds}`.",
        f"Both services serve the same index with the same settings (torch/FAISS threads 1, defaults otherwise), "
        f"alternating, {args.rounds} rounds; medians over rounds. `POST /search/text`, mode=rerank, k=10 of K=100.",
        "",
        "| service | p50 ms (c=1) | p99 ms (c=1) | req/s (c=8) |",
        "|---|---|---|---|",
        *rows,
        f"| ratio this / base | {ratio['p50']:.2f} | {ratio['p99']:.2f} | {ratio['rps']:.2f} |",
        "",
        "Every round: " + "; ".join(f"{n} " + ", ".join(f"{x['p50']:.1f} ms / {x['rps']:.0f} req/s" for x in v)
                                     for n, v in runs.items()) + ".",
    ])
    print(body)
    if not args.no_write:
        write_section(f"Service: HTTP latency, side by side with {args.base}", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
