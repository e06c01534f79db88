#!/usr/bin/env bash
# Build docker/Dockerfile.gpu on a box without Docker Hub or a GPU (proves the image builds; it
# cannot run the CUDA paths here). Wheels come from a host folder, not from docker/wheels, so the
# CPU image's build context stays small: a temporary context holds the sources and the wheels.
#
#   GPU_WHEELS=/tmp/gpu-wheels bench/docker_build_gpu.sh      # fills GPU_WHEELS first when empty
#
# Environment: BASE_IMAGE (default local/python-base:bookworm, made by bench/docker_smoke.sh
# --prepare-only), TAG (tgdt-retrieval:gpu), GPU_WHEELS (/tmp/gpu-wheels).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BASE_IMAGE=${BASE_IMAGE:-local/python-base:bookworm}
TAG=${TAG:-tgdt-retrieval:gpu}
WHEELS=${GPU_WHEELS:-/tmp/gpu-wheels}
PY=${PYTHON:-$ROOT/.venv/bin/python}
die() { echo "docker_build_gpu: $*" >&2; exit 1; }
docker info >/dev/null 2>&1 || die "docker daemon not reachable"
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "base image $BASE_IMAGE missing (bench/docker_smoke.sh --prepare-only)"

if ! ls "$WHEELS"/torch-2.13.0-*.whl >/dev/null 2>&1; then
  mkdir -p "$WHEELS"
  "$PY" docker/requirements_from_pyproject.py pyproject.toml --extras gpu > "$WHEELS/requirements.txt"
  # PyPI's default linux torch is the CUDA build; keep the host's local CPU wheel (find-links) out.
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip download -q -d "$WHEELS" \
    -r "$WHEELS/requirements.txt" "torch==2.13.0" setuptools wheel --cert /etc/ssl/certs/ca-certificates.crt
  rm -f "$WHEELS"/torch-*+cpu-*.whl
fi

CTX=$(mktemp -d /tmp/tgdt-gpu-ctx.XXXX)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/docker/wheels"
cp -r pyproject.toml encoder indexer service "$CTX/"
cp docker/Dockerfile.gpu docker/requirements_from_pyproject.py "$CTX/docker/"
cp .dockerignore "$CTX/"
ln "$WHEELS"/*.whl "$CTX/docker/wheels/" 2>/dev/null || cp "$WHEELS"/*.whl "$CTX/docker/wheels/"
t0=$(date +%s)
docker build -f "$CTX/docker/Dockerfile.gpu" --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_OFFLINE=1 \
  -t "$TAG" "$CTX" | grep -E "^(torch|Step|Successfully)|faiss gpu" || true
docker image inspect "$TAG" >/dev/null 2>&1 || die "build failed"
echo "built $TAG in $(( $(date +%s) - t0 )) s, $(( $(docker image inspect -f '{{.Size}}' "$TAG") / 1000000 )) MB"
docker run --rm "$TAG" python -c "import torch, faiss; print('torch', torch.__version__, 'cuda build', torch.version.cuda, \
'cuda available', torch.cuda.is_available(), 'faiss', faiss.__version__, 'faiss GPUs', faiss.get_num_gpus())"
