"""How fast an index's files are checked against their manifest sha256 (what `indexer verify`,
`indexer info --verify` and the service's load/swap/background checks do), and what that means
for a 1M-image index (~13 GB of fp16 token segments).

    .venv/bin/python bench/bench_verify.py [--mb 1024] [--repeats 3] [--index DIR] [--no-write]

Hashes a file of random bytes that is in the page cache (warm: the hashing itself; a cold read
is bounded by the disk instead), with the same `sha256_file` the checks use; `--index DIR` also
times `verify_files` over a real index.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402
from indexer.manifest import read_manifest, sha256_file, verify_files  # noqa: E402

TOKEN_STORE_1M_GB = 13.0


def hash_speed(mb: int, repeats: int) -> list[float]:
    """MB/s of sha256_file over a page-cached file of `mb` MB, once per repeat."""
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        path = Path(tmp) / "blob"
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        sha256_file(path)  # warm the page cache
        speeds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sha256_file(path)
            speeds.append(mb * (1 << 20) / 1e6 / (time.perf_counter() - t0))
        return speeds


def memory_speed(mb: int, repeats: int) -> list[float]:
    """MB/s of hashlib.sha256 over bytes already in memory: the hash alone, no reads."""
    data = os.urandom(mb << 20)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        out.append(len(data) / 1e6 / (time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1024, help="size of the hashed file in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--index", type=Path, help="also time verify_files over this index")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    a = p.parse_args(argv)
    load = os.getloadavg()[0]
    speeds = hash_speed(a.mb, a.repeats)
    in_memory = memory_speed(min(a.mb, 256), a.repeats)
    med = statistics.median(speeds)
    lines = [f"Machine: {machine()}; 1-minute load average {load:.1f} when it started (other jobs share the "
             "cores, so these are lower bounds).", "",
             f"Command: `.venv/bin/python bench/bench_verify.py --mb {a.mb} --repeats {a.repeats}"
             + (f" --index {a.index}" if a.index else "") + "`", "",
             "| what | MB/s (median) | runs |", "|---|---|---|",
             f"| `sha256_file`, {a.mb} MiB page-cached file, one thread | {med:.0f} | "
             f"{', '.join(f'{s:.0f}' for s in speeds)} |",
             f"| `hashlib.sha256` over {min(a.mb, 256)} MiB in memory (the hash alone) | "
             f"{statistics.median(in_memory):.0f} | {', '.join(f'{s:.0f}' for s in in_memory)} |"]
    if a.index:
        m = read_manifest(a.index)
        total = sum(int(f["bytes"]) for f in m.files.values())
        verify_files(a.index, m)  # warm
        t0 = time.perf_counter()
        problems = verify_files(a.index, m)
        dt = time.perf_counter() - t0
        lines.append(f"| `verify_files` over an index: {len(m.files)} files, {total / 1e6:.1f} MB"
                     f"{'' if not problems else ' (FAILED: ' + '; '.join(problems) + ')'} | "
                     f"{total / 1e6 / dt:.0f} | {dt:.3f} s |")
    lines += ["", f"At {med:.0f} MB/s, the ~{TOKEN_STORE_1M_GB:.0f} GB token store of a 1M-image index hashes in "
              f"~{TOKEN_STORE_1M_GB * 1e3 / med:.0f} s on one core from the page cache (longer when read from "
              "disk). Hence the service hashes the FAISS files, SQLite and codecs before it opens an index and "
              "the token segments on a background thread after a first load (`/readyz` says `verified: "
              "pending` meanwhile), while a hot swap hashes everything before swapping."]
    body = "\n".join(lines)
    print(body)
    if not a.no_write:
        write_section("Service: index checksum verification (sha256 speed)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
