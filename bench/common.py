"""What every benchmark shares: where things are, what machine it ran on, and the
BENCHMARKS.md section writer (each benchmark owns its `## title` section, others are kept)."""
from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:
        gpu = "no GPU"
    return (f"nproc={len(os.sched_getaffinity(0))}, CPU {cpu}, {gpu}, Python {platform.python_version()}, "
            f"{dt.date.today().isoformat()}")


def write_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of BENCHMARKS.md, stamped with the time."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"## {title}\n\n_{stamp}_\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    BENCHMARKS.write_text(text.rstrip("\n") + "\n")


def side_by_side(base: str, rounds: int, run) -> dict[str, list]:
    """`run(checkout)` for a temporary git worktree of `base` and for this checkout, alternating
    which goes first, `rounds` times (drift on a shared machine hits both alike):
    {"base": [...], "this": [...]} of what `run` returned."""
    import subprocess
    import sys
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="side-by-side-")) / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(tmp), base], cwd=ROOT, check=True, capture_output=True)
    runs: dict[str, list] = {"base": [], "this": []}
    try:
        for r in range(rounds):
            for name in (("base", "this") if r % 2 == 0 else ("this", "base")):
                runs[name].append(run(tmp if name == "base" else ROOT))
                print(r, name, runs[name][-1], file=sys.stderr)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp)], cwd=ROOT, capture_output=True)
    return runs
