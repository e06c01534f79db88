#!/usr/bin/env bash
# Build -> up -> search -> down for the compose stack, then record the run in BENCHMARKS.md (Deploy).
#
#   bench/docker_smoke.sh                 # everything: base image, wheels, build, index N photos, search
#   bench/docker_smoke.sh --prepare-only  # only make the base image and fill docker/wheels
#   bench/docker_smoke.sh --no-record     # do not touch BENCHMARKS.md
#
# Environment: SMOKE_IMAGES (photos indexed, default 64), SMOKE_PORT (18000), SMOKE_QUERY,
# BASE_IMAGE (default: python:3.11-slim when present or pullable, else a debootstrapped
# local/python-base:bookworm), FLICKR (collection to sample; default ../shared/data/flickr8k),
# SMOKE_NO_CACHE (1 = docker build --no-cache, for a cold-build time), SMOKE_OFFLINE (1 = install from docker/wheels only; default 1 — on this box containers cannot
# verify PyPI's TLS behind the proxy, and download.pytorch.org is unreachable).
# Needs: a running dockerd, docker-compose, and for the local base debootstrap + root.
# Runs outside CI (CI only validates the compose file: tests/test_compose.py).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

N=${SMOKE_IMAGES:-64}
PORT=${SMOKE_PORT:-18000}
QUERY=${SMOKE_QUERY:-"a dog runs through the snow"}
FLICKR=${FLICKR:-$ROOT/../shared/data/flickr8k}
OFFLINE=${SMOKE_OFFLINE:-1}
TAG=${TGDT_IMAGE:-tgdt-retrieval:cpu}
LOCAL_BASE=local/python-base:bookworm
WORK=${SMOKE_WORK:-/tmp/tgdt-smoke}
PROJECT=tgdt-smoke
PY=${PYTHON:-$ROOT/.venv/bin/python}
PREPARE_ONLY=0; RECORD=1
for a in "$@"; do
  case "$a" in
    --prepare-only) PREPARE_ONLY=1 ;;
    --no-record) RECORD=0 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "docker_smoke: unknown argument $a" >&2; exit 2 ;;
  esac
done

die() { echo "docker_smoke: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "docker daemon not reachable: start it (dockerd > /tmp/dockerd.log 2>&1 &)"
if command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
else die "docker-compose is not installed (apt-get install docker-compose)"; fi

# ------------------------------------------------------------------ base image
make_local_base() {
  command -v debootstrap >/dev/null || die "no base image and no debootstrap (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  local rootfs; rootfs=$(mktemp -d /tmp/tgdt-rootfs.XXXX)
  log "debootstrapping Debian bookworm (python3, venv, pip) into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >/tmp/tgdt-debootstrap.log 2>&1 \
    || die "debootstrap failed, see /tmp/tgdt-debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
}
if [ -z "${BASE_IMAGE:-}" ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    BASE_IMAGE=python:3.11-slim
  else
    docker image inspect "$LOCAL_BASE" >/dev/null 2>&1 || make_local_base
    BASE_IMAGE=$LOCAL_BASE
  fi
fi
log "base image: $BASE_IMAGE"

# ------------------------------------------------------------------ wheels (offline install)
if [ "$OFFLINE" = 1 ]; then
  log "filling docker/wheels (pip download on the host: torch==2.13.0+cpu and every cpu requirement)"
  "$PY" docker/requirements_from_pyproject.py pyproject.toml --extras cpu > "$WORK.req.txt"
  "$PY" -m pip download -q -d docker/wheels -r "$WORK.req.txt" "torch==2.13.0+cpu" setuptools wheel 2>&1 \
    | grep -v "is ignored" || true
  rm -f "$WORK.req.txt"
fi
[ "$PREPARE_ONLY" = 1 ] && { log "prepared"; exit 0; }

# ------------------------------------------------------------------ build
log "building $TAG"
BUILD_CACHE=layers
NOCACHE=()
[ "${SMOKE_NO_CACHE:-0}" = 1 ] && { NOCACHE=(--no-cache); BUILD_CACHE=none; }
t0=$(now)
docker build -q "${NOCACHE[@]}" -f docker/Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_OFFLINE="$OFFLINE" \
  -t "$TAG" . >/dev/null || die "image build failed"
BUILD_S=$(elapsed "$t0")
SIZE=$(docker image inspect -f '{{.Size}}' "$TAG")
log "built in ${BUILD_S}s, $(( SIZE / 1000000 )) MB"

# ------------------------------------------------------------------ collection: N test photos, read at run time
[ -f "$FLICKR/pairs.jsonl" ] || die "collection not found: $FLICKR/pairs.jsonl (set FLICKR=)"
rm -rf "$WORK"; mkdir -p "$WORK/data/images" "$WORK/models"
"$PY" - "$FLICKR" "$WORK/data" "$N" <<'EOF'
import json, shutil, sys
from pathlib import Path
src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(l) for l in (src / "pairs.jsonl").open()]
rows = [r for r in rows if r.get("split") == "test"][:n]
with (dst / "pairs.jsonl").open("w") as f:
    for r in rows:
        shutil.copyfile(src / r["image"], dst / r["image"])
        f.write(json.dumps(r) + "\n")
print(f"{len(rows)} images, {sum(len(r['captions']) for r in rows)} captions", file=sys.stderr)
EOF
chmod -R a+rX "$WORK"

# The committed default model is baked into the image; without it, index with a tiny random one.
OVERRIDE=()
if [ ! -f encoder/default_model/config.json ]; then
  log "encoder/default_model absent: using a tiny random checkpoint (answers are not meaningful)"
  "$PY" - "$WORK/models/tiny" <<'EOF'
import sys
sys.path.insert(0, "tests")
from conftest import make_tiny_checkpoint
make_tiny_checkpoint(sys.argv[1])
EOF
  chmod -R a+rX "$WORK/models"
  cat > "$WORK/override.yml" <<EOF
services:
  indexer:
    volumes: ["$WORK/models:/models:ro"]
  service:
    volumes: ["$WORK/models:/models:ro"]
EOF
  OVERRIDE=(-f "$WORK/override.yml")
  export INDEXER_ARGS="--checkpoint /models/tiny"
  MODEL="tiny random checkpoint (encoder/default_model absent at build time)"
else
  MODEL="encoder/default_model"
fi

dc() { TGDT_DATA="$WORK/data" TGDT_PORT="$PORT" TGDT_IMAGE="$TAG" "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml "${OVERRIDE[@]}" "$@"; }
cleanup() { dc down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

# ------------------------------------------------------------------ up
log "compose up (indexer one-shot, then service)"
t0=$(now)
dc up -d --no-build service >/dev/null 2>&1 || { dc logs indexer | tail -20 >&2; die "compose up failed"; }
INDEXER_ID=$(dc ps -q indexer)
INDEX_S=$("$PY" - "$(docker inspect -f '{{.State.StartedAt}} {{.State.FinishedAt}}' "$INDEXER_ID")" <<'EOF'
import sys
from datetime import datetime
a, b = sys.argv[1].split()
p = lambda s: datetime.fromisoformat(s[:26].rstrip("Z"))
print(f"{(p(b) - p(a)).total_seconds():.1f}")
EOF
)
SERVICE_ID=$(dc ps -q service)
for _ in $(seq 1 180); do
  state=$(docker inspect -f '{{.State.Health.Status}}' "$SERVICE_ID" 2>/dev/null || echo gone)
  [ "$state" = healthy ] && break
  [ "$state" = unhealthy ] || [ "$state" = gone ] && { dc logs service | tail -30 >&2; die "service is $state"; }
  sleep 2
done
[ "$state" = healthy ] || { dc logs service | tail -30 >&2; die "service not healthy after 360s"; }
for _ in $(seq 1 60); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 1; done
UP_S=$(elapsed "$t0")
log "healthy and ready after ${UP_S}s (index build ${INDEX_S}s)"

# ------------------------------------------------------------------ search
# one warm-up, then 20 timed round trips over HTTP; the median goes in the record
SEARCH_MS=$("$PY" - "http://127.0.0.1:$PORT/search/text" "$QUERY" "$WORK/answer.json" <<'EOF'
import json, statistics, sys, time, urllib.request
url, query, out = sys.argv[1:4]
body = json.dumps({"query": query, "k": 5}).encode()
def call():
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()
call()
times = []
for _ in range(20):
    t0 = time.perf_counter(); answer = call(); times.append((time.perf_counter() - t0) * 1000)
open(out, "wb").write(answer)
print(f"{statistics.median(times):.1f}")
EOF
) || die "search failed"
log "search: median ${SEARCH_MS} ms over 20 calls"

# ------------------------------------------------------------------ down + record
dc down -v --remove-orphans >/dev/null 2>&1
trap - EXIT
log "down"
if [ "$RECORD" = 1 ]; then
  "$PY" bench/bench_deploy.py record-smoke --answer "$WORK/answer.json" --query "$QUERY" --images "$N" \
    --base "$BASE_IMAGE" --tag "$TAG" --size-bytes "$SIZE" --build-s "$BUILD_S" --index-s "$INDEX_S" \
    --up-s "$UP_S" --search-ms "$SEARCH_MS" --build-cache "$BUILD_CACHE" --model "$MODEL" --offline "$OFFLINE" --pairs "$WORK/data/pairs.jsonl" \
    --command "SMOKE_IMAGES=$N SMOKE_NO_CACHE=${SMOKE_NO_CACHE:-0} bench/docker_smoke.sh $*"
fi
"$PY" -c 'import json,sys; a=json.load(open(sys.argv[1])); [print(h["id"], round(h["score"], 4), h["image_url"]) for h in a["hits"]]' "$WORK/answer.json"
