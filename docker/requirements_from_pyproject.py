"""Print pyproject.toml's runtime requirements (plus chosen extras), one per line.

WHY: the image installs dependencies in a layer keyed only on pyproject.toml, so editing
source code does not re-download torch. `pip install .` cannot install deps without the
package itself, hence this tiny extractor (stdlib only: it runs before anything is installed).
"""
from __future__ import annotations

import argparse
import sys

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10 bases (e.g. Ubuntu 22.04 CUDA images)
    from pip._vendor import tomli as tomllib  # pip always vendors a TOML reader


def requirements(pyproject: str, extras: list[str], exclude: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject has {sorted(optional)}")
        reqs += optional[extra]
    def name(req: str) -> str:
        for sep in "<>=!~[; ":
            req = req.split(sep, 1)[0]
        return req.strip().lower()
    return [r for r in reqs if name(r) not in {e.lower() for e in exclude}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pyproject")
    ap.add_argument("--extras", default="", help="comma-separated extras, e.g. cpu or gpu")
    ap.add_argument("--exclude", default="torch", help="comma-separated names installed separately (pinned torch)")
    a = ap.parse_args()
    extras = [e for e in a.extras.split(",") if e]
    exclude = [e for e in a.exclude.split(",") if e]
    sys.stdout.write("\n".join(requirements(a.pyproject, extras, exclude)) + "\n")


if __name__ == "__main__":
    main()
