"""Dockerfiles: base image as a build argument, multi-stage, non-root, health-checked, and
exactly one faiss flavour per image (faiss-cpu and faiss-gpu in one env break each other)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ROOT / "docker" / "requirements_from_pyproject.py"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name,default_base", [("Dockerfile", "python:3.11-slim"),
                                               ("Dockerfile.gpu", "nvidia/cuda:")])
def test_dockerfile_shape(name, default_base):
    ins = instructions(ROOT / "docker" / name)
    assert ins[0][0] == "ARG" and ins[0][1].startswith(f"BASE_IMAGE={default_base}"), "base must be a build arg"
    froms = [args for op, args in ins if op == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE_IMAGE}") for f in froms), "multi-stage on the chosen base"
    final = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "runtime stage must drop root"
    health = [args for op, args in final if op == "HEALTHCHECK"]
    assert health and "/healthz" in health[0]
    assert any(op == "COPY" and "--from=builder" in args for op, args in final)


def test_cpu_image_pins_a_cpu_torch():
    args = dict(a.split("=", 1) for op, a in instructions(ROOT / "docker" / "Dockerfile") if op == "ARG" and "=" in a)
    assert args["TORCH_SPEC"].strip('"') == "torch==2.13.0+cpu"


def extract(extras: str) -> list[str]:
    r = subprocess.run([sys.executable, str(EXTRACT), str(ROOT / "pyproject.toml"), "--extras", extras],
                       capture_output=True, text=True, check=True)
    return r.stdout.split()


def names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_requirements_pick_one_faiss_and_leave_torch_to_the_pin():
    cpu, gpu = names(extract("cpu")), names(extract("gpu"))
    assert "faiss-cpu" in cpu and not any(n.startswith("faiss-gpu") for n in cpu)
    assert any(n.startswith("faiss-gpu") for n in gpu) and "faiss-cpu" not in gpu
    assert "torch" not in cpu | gpu, "torch is installed from TORCH_SPEC, never unpinned"
    assert {"fastapi", "h5py", "transformers"} <= cpu


def test_requirements_reject_unknown_extra():
    r = subprocess.run([sys.executable, str(EXTRACT), str(ROOT / "pyproject.toml"), "--extras", "nope"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "unknown extra" in r.stderr


def test_dockerignore_keeps_venv_git_and_data_out():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include what the image needs"
    included = {l[1:] for l in lines if l.startswith("!")}
    assert {"pyproject.toml", "encoder/", "indexer/", "service/"} <= included
    assert not any(p.startswith((".venv", ".git", "data", "runs")) for p in included)
