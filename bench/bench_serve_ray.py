"""Ray Serve (2 shards) against the single-box service on the same synthetic index, side by side.

    .venv/bin/python bench/bench_serve_ray.py [--n 1000000] [--rounds 3] [--workdir DIR]

One run: a synthetic index of --n images (the 1M bench's recipe: real Flickr8k seed embeddings
plus noise, `bench/bench_indexer_1m.py`) written three times in one stream -- whole, and split
in two by id parity (shard s holds image i = 2 * local + s, so the Ray path's served ids equal
the whole index's). The shards are built `--faiss-like` the whole index (its trained FAISS
gallery refilled): they probe the lists the whole index probes, so the exact merge must give
the whole index's answer with IVF too. Then, with real Flickr8k test captions, K=100 re-rank,
k=10, the three paths up at once and measured in alternating rounds (latency at concurrency 1,
throughput at 8):
1. the single-box service (`service --index whole`, one process);
2. Ray Serve on a local cluster of this box's cores (2 shards x 1 replica, 0.5 CPU each; the
   ingress 0.25) through Serve's HTTP proxy;
3. the same ingress replica on its own port (direct ingress, no proxy hop);
answers compared hit by hit (ids and scores). Then the failure run: 2 shards x 2 replicas
under load at concurrency 4 for --fail-seconds, one shard replica killed every 15 s; requests
that did not answer 200, and the memory (RSS) of the Ray processes sampled through it.
Appends the section "Serving: Ray Serve, 2 shards vs one box" to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from indexer_common import FLICKR, checkpoint, machine, write_section  # noqa: E402

SECTION = "Serving: Ray Serve, 2 shards vs one box"
BODY = {"k": 10, "candidates": 100}


def build(work: Path, n: int, real: int, ckpt_arg: str | None, faiss: str = "auto") -> tuple[dict[str, Path], str]:
    from encoder.data import load_pairs
    from encoder.evaluate import encode_collection
    from encoder.model import checkpoint_digest
    from encoder.pipeline import Encoder
    from indexer import metadata
    from indexer.build import finalize
    from indexer.config import BuildConfig
    from indexer.manifest import META
    from indexer.tokenstore import RawKind, TokenCodec

    ckpt, label = checkpoint(ckpt_arg, work)
    encoder = Encoder.from_pretrained(ckpt)
    col = load_pairs(FLICKR, limit=real)
    col.captions, col.caption_image = col.captions[:real], col.caption_image[:real]
    images, _ = encode_collection(encoder, col, workers=1, progress=False)
    seed_g, seed_t = images.global_.numpy(), images.tokens.numpy()
    R, T, D = seed_t.shape
    Dg = seed_g.shape[1]
    names = {"whole": None, "shard0": 0, "shard1": 1}
    folders = {k: work / f"{k}.partial" for k in names}
    codec = TokenCodec("int8", D)
    rng = np.random.default_rng(0)
    sinks = {}
    for k, f in folders.items():
        f.mkdir(parents=True)
        sinks[k] = (RawKind.at(f, "image"), RawKind.at(f, "caption"), metadata.connect(f / META))
    pool = seed_t[rng.integers(0, R, 4096)] + rng.standard_normal((4096, T, D)).astype(np.float32) * (0.75 / np.sqrt(D))
    pool /= np.linalg.norm(pool, axis=2, keepdims=True)
    pool_codes = codec.encode(pool.reshape(-1, D)).reshape(4096, T, codec.row_bytes)
    for s in range(0, n, 4096):
        b = min(4096, n - s)
        g = seed_g[rng.integers(0, R, b)] + rng.standard_normal((b, Dg)).astype(np.float32) * (0.75 / np.sqrt(Dg))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        codes = pool_codes[rng.integers(0, 4096, b)]
        ids = np.arange(s, s + b, dtype=np.int64)
        for k, shard in names.items():
            sel = np.ones(b, bool) if shard is None else (ids % 2 == shard)
            local = ids[sel] if shard is None else ids[sel] // 2
            raw, _, con = sinks[k]
            raw.append(codes[sel].reshape(-1, codec.row_bytes), g[sel], local, np.full(int(sel.sum()), T, np.int64),
                       codec.row_bytes)
            metadata.insert_items(con, [(int(li), "image", f"synthetic/{int(gi):07d}.jpg", None, None,
                                         {"n": int(gi)}, None, 0, int(li)) for li, gi in zip(local, ids[sel])])
    fake = SimpleNamespace(dim=Dg, token_dim=D, image_backbone=SimpleNamespace(grid=encoder.image_backbone.grid),
                           model=encoder.model)
    out = {}
    for k, f in folders.items():
        raw, cap, con = sinks[k]
        metadata.add_fields(con, {"n": 0})
        con.commit()
        con.close()
        cap.truncate({})
        # the shards reuse the whole index's trained FAISS (`indexer build --faiss-like`): they
        # probe the lists the whole index probes, so even IVF answers must be the same
        cfg = BuildConfig(images=str(FLICKR), out=str(work / k), tokens="int8", faiss=faiss, checkpoint=ckpt,
                          faiss_like=None if k == "whole" else str(work / "whole"))
        finalize(f, cfg, fake, FLICKR, checkpoint_digest(ckpt), {})
        os.replace(f, work / k)
        for kind in ("image", "caption"):
            RawKind.at(work / k, kind).remove()
        out[k] = work / k
    return out, label


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, limit_s: float = 600) -> None:
    t = time.time()
    while time.time() - t < limit_s:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"bench_serve_ray: {url} not ready after {limit_s} s")


def answers(url: str, queries: list[str], stages: list | None = None) -> tuple[list[list[tuple]], list[float]]:
    """Each query once, in order: its hits (id, score) and the wall ms of the call (`stages`
    collects each answer's timings_ms with the wall time as `wall`)."""
    out, ms = [], []
    with httpx.Client(base_url=url, timeout=60) as c:
        for q in queries:
            t = time.perf_counter()
            r = c.post("/search/text", json={"query": q, **BODY})
            ms.append(1000 * (time.perf_counter() - t))
            r.raise_for_status()
            out.append([(h["id"], h["score"]) for h in r.json()["hits"]])
            if stages is not None:
                stages.append({**r.json()["timings_ms"], "wall": ms[-1]})
    return out, ms


def breakdown(stages: list[dict]) -> str:
    """Median ms of where a request's time goes: the app's own stages (for the Ray path: encode
    in the ingress, faiss and rerank of the slowest shard, and the fan-out's wall beyond them:
    the handle calls, the shards' request handling, the pickled answers), the rest of the app's
    request time (merge, response), and what is outside the app (HTTP server; Ray: the proxy)."""
    keys = ("encode", "faiss", "rerank", "request", "wall")
    med = {k: float(np.median([s[k] for s in stages])) for k in keys}
    fan = [s["fanout"] for s in stages if s.get("fanout") is not None]
    work = med["faiss"] + med["rerank"]
    transport = f", fan-out beyond the shards' faiss + rerank {float(np.median(fan)) - work:.1f}" if fan else ""
    inside = med["request"] - med["encode"] - (float(np.median(fan)) if fan else work)
    return (f"encode {med['encode']:.1f}, faiss {med['faiss']:.1f}, rerank {med['rerank']:.1f}{transport}, rest of "
            f"the app's request {inside:.1f}, outside the app {med['wall'] - med['request']:.1f} (wall {med['wall']:.1f})")


class Load:
    """`threads` clients sending queries back to back; counts answers by status."""

    def __init__(self, url: str, queries: list[str], threads: int):
        self.url, self.queries, self.stop = url, queries, threading.Event()
        self.status: dict[str, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            n = i
            while not self.stop.is_set():
                try:
                    key = str(c.post("/search/text", json={"query": self.queries[n % len(self.queries)], **BODY})
                              .status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                n += 1
                with self.lock:
                    self.status[key] = self.status.get(key, 0) + 1

    def run(self, seconds: float, during=None) -> float:
        """Requests per second over `seconds` (`during()` runs on this thread meanwhile)."""
        for t in self.threads:
            t.start()
        time.sleep(2)  # ramp
        with self.lock:
            start = sum(self.status.values())
        t0 = time.perf_counter()
        if during is not None:
            during(seconds)
        else:
            time.sleep(seconds)
        with self.lock:
            done = sum(self.status.values()) - start
        rate = done / (time.perf_counter() - t0)
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return rate


def hop_floor(calls: int = 200) -> dict[str, float]:
    """Median ms of one call that does nothing (a 12 KB bytes argument echoed back), from this
    driver: to a plain Ray actor, and to a Serve deployment through a deployment handle (what
    the ingress pays per shard call before any search work)."""
    import ray
    from ray import serve

    @ray.remote(num_cpus=0.1)
    class EchoActor:
        def echo(self, x: bytes) -> bytes:
            return x

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, logging_config={"enable_access_log": False})
    class Echo:
        def echo(self, x: bytes) -> bytes:
            return x

    actor = EchoActor.remote()
    serve.run(Echo.bind(), name="echo-floor", route_prefix=None)
    handle = serve.get_deployment_handle("Echo", app_name="echo-floor")
    payload = b"x" * 12_000
    out = {}
    for name, call in (("Ray actor call", lambda: ray.get(actor.echo.remote(payload))),
                       ("Serve handle call", lambda: handle.echo.remote(payload).result())):
        for _ in range(20):
            call()
        ms = []
        for _ in range(calls):
            t = time.perf_counter()
            call()
            ms.append(1000 * (time.perf_counter() - t))
        out[name] = float(np.median(ms))
    serve.delete("echo-floor")
    ray.kill(actor)
    return out


def descendants_rss_mib(root: int) -> float:
    """RSS of every process below `root` (the local Ray cluster this process started)."""
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    below, frontier = set(), {root}
    while frontier:
        frontier = {c for c, pp in parent.items() if pp in frontier} - below
        below |= frontier
    total = 0
    for pid in below:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="images in the synthetic index")
    ap.add_argument("--real", type=int, default=128, help="real Flickr8k seed images")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the three paths (medians)")
    ap.add_argument("--seconds", type=float, default=10, help="each throughput window")
    ap.add_argument("--fail-seconds", type=float, default=60)
    ap.add_argument("--faiss", default="auto", help="the FAISS kind of the whole index (auto: IVF from 100k); "
                    "the shards reuse its trained gallery")
    ap.add_argument("--section", default=SECTION)
    ap.add_argument("--checkpoint")
    ap.add_argument("--workdir", help="keep the indexes here (and reuse them when they are already built)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if not (FLICKR / "pairs.jsonl").is_file():
        print(f"bench_serve_ray: {FLICKR} not found (../shared beside the checkout)", file=sys.stderr)
        return 2
    from encoder.data import load_pairs
    from indexer.manifest import read_manifest

    load0 = os.getloadavg()[0]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-serve-ray-"))
    t0 = time.perf_counter()
    names = ("whole", "shard0", "shard1")
    if all((work / k / "manifest.json").is_file() for k in names):
        idx, label, build_s = {k: work / k for k in names}, f"checkpoint {a.checkpoint or 'default'}", None
    else:
        idx, label = build(work, a.n, a.real, a.checkpoint, a.faiss)
        build_s = time.perf_counter() - t0
        print(f"built 3 indexes in {build_s:.0f} s", flush=True)
    gallery = read_manifest(idx["whole"]).faiss["image"]
    queries = load_pairs(FLICKR, split="test").captions[::5][: a.queries]

    # the single box, and Ray Serve (2 shards x 1 replica) with direct ingress on, so the same
    # ingress replica is reached through Serve's proxy and on its own port
    port = free_port()
    # no background checksum pass: it streams the whole index (29 GB at 1M, both copies) through
    # the page cache during the first rounds and evicts the pages the queries use
    os.environ["SERVICE_VERIFY"] = "off"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    box = subprocess.Popen([sys.executable, "-m", "service.cli", "--index", str(idx["whole"]), "--port", str(port)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import ray
    from ray import serve

    from service.ray_serve import deploy, ingress_targets

    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": ray_port})
    shards = [str(idx["shard0"]), str(idx["shard1"])]
    deploy(shards, "v1", {"replicas": 1, "num_cpus": 0.5}, {"num_cpus": 0.25})
    direct = ingress_targets("127.0.0.1")
    if not direct:
        raise SystemExit("bench_serve_ray: the ingress replica has no direct-ingress port")
    paths = {"one box": f"http://127.0.0.1:{port}", "Ray Serve, 2 shards x 1, via Serve's proxy":
             f"http://127.0.0.1:{ray_port}", "Ray Serve, 2 shards x 1, direct ingress": direct[0]}
    lat: dict[str, list[float]] = {p: [] for p in paths}
    rates: dict[str, list[float]] = {p: [] for p in paths}
    stages: dict[str, list[dict]] = {p: [] for p in paths}
    got: dict[str, list] = {}
    try:
        for url in paths.values():
            wait_ready(url)
            answers(url, queries[:20])  # warm: pages, threads, connections
        for _ in range(a.rounds):  # alternating, so a change in the box's load hits every path alike
            for name, url in paths.items():
                # each path warm before it is measured: at 1M the two copies of the index (one box's,
                # the shards') do not both fit in this box's page cache, so a path's pages are
                # evicted while the others run
                answers(url, queries)
                got[name], ms = answers(url, queries, stages[name])
                lat[name] += ms
                rates[name].append(Load(url, queries, 8).run(a.seconds))
    finally:
        box.terminate()
        box.wait(30)
    base = "one box"
    compare = {name: (sum([i for i, _ in x] == [i for i, _ in y] for x, y in zip(got[base], got[name])),
                      max(abs(s1 - s2) for x, y in zip(got[base], got[name]) for (_, s1), (_, s2) in zip(x, y)))
               for name in paths if name != base}

    floor = hop_floor()

    # the failure run: 2 x 2, one replica killed every 15 s
    url = paths["Ray Serve, 2 shards x 1, via Serve's proxy"]
    deploy(shards, "v1", {"replicas": 2, "num_cpus": 0.25}, {"num_cpus": 0.25})
    wait_ready(url)
    rss: list[float] = []
    kills: list[str] = []

    def kill_some(seconds: float) -> None:
        end = time.time() + seconds
        next_kill = time.time() + 5
        while time.time() < end:
            rss.append(descendants_rss_mib(os.getpid()))
            if time.time() >= next_kill:
                victims = [x for x in ray.util.list_named_actors(all_namespaces=True)
                           if f"shard{len(kills) % 2}-v1#Shard" in x["name"]]
                if victims:
                    ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
                    kills.append(victims[0]["name"].split("::")[-1])
                next_kill += 15
            time.sleep(1)

    load = Load(url, queries, 4)
    fail_rate = load.run(a.fail_seconds, during=kill_some)
    time.sleep(2)
    rss.append(descendants_rss_mib(os.getpid()))
    serve.shutdown()
    ray.shutdown()

    def pct(ms: list[float], p: float) -> float:
        return float(np.percentile(ms, p))

    base_p50, base_rate = pct(lat[base], 50), float(np.median(rates[base]))
    table = "\n".join(f"| {name} | {pct(lat[name], 50):.1f} | {pct(lat[name], 99):.1f} | "
                      f"{pct(lat[name], 50) - base_p50:+.1f} | {float(np.median(rates[name])):.1f} | "
                      f"{float(np.median(rates[name])) / base_rate:.2f}x |" for name in paths)
    same = "; ".join(f"{name}: **{n}/{len(queries)}** identical (ids in order), largest score difference {d:.2e}"
                     for name, (n, d) in compare.items())
    where = "; ".join(f"{name}: {breakdown(stages[name])}" for name in paths)
    lost = sum(v for k, v in load.status.items() if k != "200")
    cmd = "`.venv/bin/python bench/bench_serve_ray.py " + shlex.join(argv if argv is not None else sys.argv[1:]) + "`"
    built = f"building all three took {build_s:.0f} s" if build_s is not None else "reused from --workdir"
    body = f"""Command: {cmd}
Machine: {machine()}. All paths on the same box at the same time, {a.rounds} alternating rounds; in each, every
path gets one unmeasured pass of the queries, then the latency pass, then the throughput window.
Index: {a.n:,} synthetic images ({label}; {a.real} real Flickr8k seeds, the 1M bench's noise recipe), written
whole and split in two by id parity (shard s holds image 2 * local + s), tokens int8; FAISS of the whole index
`{gallery.factory}` (nprobe {gallery.nprobe}); the shards were built `--faiss-like` the whole index (its trained
gallery refilled), so they probe the same lists and the exact merge must give the whole index's answer; {built}.
Load average of the box (shared with other jobs): {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.
Queries: {len(queries)} real Flickr8k test captions, k=10, K=100 re-rank (`candidates: 100`), over HTTP.
One box: `service --index whole` (one process, default settings). Ray: local cluster `num_cpus=2`, 2 shard
applications x 1 replica (`num_cpus` 0.5 each) + the ingress (0.25), `service.ray_serve.deploy`, reached through
Serve's HTTP proxy and, with `RAY_SERVE_ENABLE_DIRECT_INGRESS=1` (`service-ray run --direct-ingress`), on the
ingress replica's own port. Index checksums are not verified on start (`SERVICE_VERIFY=off`) on any path: the
background pass would stream every copy of the index through the page cache while the rounds run.

| path | p50 ms (c=1) | p99 ms (c=1) | p50 overhead ms (target <= 5) | req/s at concurrency 8 | x one box (target >= 0.8) |
|---|---|---|---|---|---|
{table}

- Where the time goes at c=1 (median ms): {where}.
- Answers against the one box: {same}.
- The floor of one hop on this box (median of 200 calls that do nothing, 12 KB echoed, from the driver while the
  deployment idles): {"; ".join(f"{k} {v:.2f} ms" for k, v in floor.items())}. The Ray path has at least one
  Serve handle hop per request (the shards are called in parallel), the proxy path two.
- Failure run (through the proxy): 2 shards x 2 replicas (0.25 CPU each), concurrency 4 for {a.fail_seconds:.0f} s,
  {len(kills)} shard replicas killed (`ray.kill`, one every 15 s, alternating shards): {sum(load.status.values())}
  requests ({fail_rate:.1f}/s), **{lost} not answered 200** ({load.status}). RSS of all Ray processes:
  {rss[0]:,.0f} MiB at the start, {max(rss):,.0f} MiB peak, {rss[-1]:,.0f} MiB at the end (samples every second).
"""
    print(body)
    if not a.no_write:
        write_section(a.section, body)
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
