"""Property-based fuzzing of the whole HTTP API from its OpenAPI spec: 0 server errors expected.

    .venv/bin/python bench/bench_service_schemathesis.py [--max-examples 100] [--index DIR]

Serves a small real index (built here with random tiny backbones unless --index is given) on a
loopback port and runs `schemathesis run` with the `not_a_server_error` check over every
operation; writes the outcome to the "Service: API fuzzing" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service_common import REPO, Served, tiny_index, write_section  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--max-examples", type=int, default=100)
    p.add_argument("--index", type=Path)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="svc-fuzz-"))
    index = args.index or tiny_index(tmp)
    schemathesis = Path(sys.executable).parent / "schemathesis"
    with Served(index, env={"SERVICE_ADMIN_KEY": "bench-admin-key"}) as s:
        s.wait_ready()
        cmd = [str(schemathesis), "run", f"{s.url}/openapi.json", "--checks", "not_a_server_error",
               "--max-examples", str(args.max_examples), "--generation-deterministic", "--request-timeout", "30",
               "--exclude-path", "/admin/reload"]
        t0 = time.time()
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        took = time.time() - t0
        out = run.stdout + run.stderr
        server_log = ""
    print(out[-4000:])
    errors_5xx = len(re.findall(r"Server error", out))
    summary = [line.strip() for line in out.splitlines() if re.search(r"\b(passed|failed|errored|skipped)\b", line)]
    body = f"""Command: `.venv/bin/python bench/bench_service_schemathesis.py --max-examples {args.max_examples}`
(schemathesis `not_a_server_error` over every operation of `/openapi.json`, deterministic generation, a small
real index on 127.0.0.1; `/admin/reload` excluded because fuzzing it would point the service at random paths —
its error paths are covered by tests).

- exit code: {run.returncode} ({'0 server errors' if run.returncode == 0 else 'FAILURES, see output'})
- server-error failures reported: {errors_5xx}
- run time: {took:.0f} s
- summary: {' / '.join(summary[-3:]) if summary else '(see output)'}
"""
    if not args.no_write:
        write_section("Service: API fuzzing (schemathesis)", body)
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
