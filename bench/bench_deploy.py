"""Record deploy measurements in the "Deploy" section of BENCHMARKS.md.

WHY a separate writer: several benchmarks share BENCHMARKS.md, so each one rewrites only its
own block (between `<!-- deploy:NAME -->` markers inside `## Deploy`) and leaves every other
section byte-for-byte intact.

  python bench/bench_deploy.py record-smoke --answer answer.json ...   # called by bench/docker_smoke.sh
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import subprocess
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402,F401  (bench_deploy_ray imports it from here)

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "## Deploy"
INTRO = ("Docker images, the compose stack and the Ray build. Produced by `bench/docker_smoke.sh` and "
         "`bench/bench_deploy_ray.py`; no GPU machine was lent to this task, so GPU figures are absent "
         "(see docs/deploy.md).")


def git_rev() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def update_block(text: str, name: str, body: str) -> str:
    """Replace (or add) block `name` inside the Deploy section; other sections untouched."""
    block = f"<!-- deploy:{name} -->\n{body.rstrip()}\n<!-- /deploy:{name} -->"
    if SECTION not in text.splitlines():
        text = (text.rstrip() + "\n\n" if text.strip() else "# Benchmarks\n\n") + f"{SECTION}\n\n{INTRO}\n"
    lines = text.splitlines(keepends=True)
    start = next(i for i, l in enumerate(lines) if l.rstrip("\n") == SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = "".join(lines[start:end])
    pattern = re.compile(rf"<!-- deploy:{re.escape(name)} -->.*?<!-- /deploy:{re.escape(name)} -->", re.S)
    if pattern.search(section):
        section = pattern.sub(lambda _: block, section)
    else:
        section = section.rstrip() + "\n\n" + block + "\n"
    if end < len(lines) and not section.endswith("\n\n"):
        section = section.rstrip("\n") + "\n\n"
    return "".join(lines[:start]) + section + "".join(lines[end:])


def write_block(name: str, body: str, path: Path = BENCHMARKS) -> None:
    text = path.read_text() if path.exists() else ""
    path.write_text(update_block(text, name, body))


def smoke_body(a: argparse.Namespace) -> str:
    answer = json.loads(Path(a.answer).read_text())
    hits = answer.get("hits", [])
    # image id = line of the smoke's pairs.jsonl (it names every image of the collection, in order)
    pairs = [json.loads(line) for line in Path(a.pairs).read_text().splitlines()] if a.pairs else []

    def what(h: dict) -> str:
        i = h.get("image_id")
        if isinstance(i, int) and i < len(pairs):
            return f"`{Path(pairs[i]['image']).name}` — \"{pairs[i]['captions'][0]}\""
        return f"`{h.get('image_url')}`"
    rows = "\n".join(f"| {i + 1} | {h['id']} | {h['score']:.4f} | {h['global_score']:.4f} | {what(h)} |"
                      for i, h in enumerate(hits))
    timings = answer.get("timings_ms") or {}
    t = ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items() if isinstance(v, (int, float)))
    return f"""### Compose smoke: build -> up -> search -> down (CPU image)

- Date: {dt.date.today().isoformat()}, commit {a.commit or git_rev()}; machine: {machine()}; no GPU.{chr(10) + "- " + a.note if a.note else ""}
- Command: `{a.command.strip()}`
- Base image: `{a.base}` (Docker Hub unreachable here: a debootstrapped Debian bookworm root imported with
  `docker import`); wheels installed {"offline from docker/wheels" if a.offline == "1" else "from the indexes"}.
- Image `{a.tag}`: **{a.size_bytes / 1e9:.2f} GB**; `docker build` {a.build_s} s
  ({"cold: --no-cache, base image present" if a.build_cache == "none" else "with the layer cache of earlier builds"}).
- Collection: {a.images} Flickr8k test photos (5 captions each), model: {a.model}.
- `docker-compose up -d service` -> healthy and ready: {a.up_s} s, of which the one-shot indexer ran {a.index_s} s
  (container start, model load, encode, FAISS + token store write).
- `POST /search/text {{"query": "{a.query}", "k": 5}}` through the published port: median {a.search_ms} ms
  over 20 calls after one warm-up (server timings of the last: {t or "n/a"}).

| rank | id | score (fused) | global | image — its first human caption |
|---:|---:|---:|---:|---|
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("record-smoke", help="record a bench/docker_smoke.sh run")
    for flag in ("answer", "query", "images", "base", "tag", "build-s", "build-cache", "index-s", "up-s",
                 "search-ms", "model", "offline", "command"):
        s.add_argument(f"--{flag}", required=True)
    s.add_argument("--size-bytes", type=int, required=True)
    s.add_argument("--pairs", help="the smoke collection's pairs.jsonl (names the hits)")
    s.add_argument("--note", default="", help="one line of context (e.g. machine load during the run)")
    s.add_argument("--commit", default=None, help="commit the run was made at (default: HEAD now)")
    a = ap.parse_args(argv)
    if a.cmd == "record-smoke":
        write_block("smoke", smoke_body(a))
        print(f"recorded in {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
