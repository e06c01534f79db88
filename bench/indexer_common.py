"""Shared by the indexer benchmarks: machine description, the checkpoint to use, BENCHMARKS.md I/O."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or ""
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
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    return f"nproc={nproc}, CPU {cpu}, {gpu}, {_dt.date.today().isoformat()}"


def checkpoint(path: str | None, workdir: Path) -> tuple[str | None, str]:
    """(checkpoint path or None for the default model, a label saying which one was used)."""
    from encoder.model import DEFAULT_CHECKPOINT

    if path:
        return path, f"checkpoint {path}"
    if (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        return None, "the committed default model (encoder/default_model)"
    # No trained model yet: real backbones (EfficientNet-Lite0 + MiniLM) with untrained heads.
    # Costs and byte counts are those of the real model; retrieval quality is not.
    import torch

    from encoder.config import ModelConfig
    from encoder.model import TGDTModel

    torch.manual_seed(0)
    out = workdir / "untrained-real-backbones"
    TGDTModel(ModelConfig(), image_dim=1280, text_dim=384, image_grid=(7, 7)).eval().save_pretrained(out)
    return str(out), "UNTRAINED heads on the real backbones (no default model was committed yet)"


def write_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of BENCHMARKS.md, keeping everyone else's."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pat = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text.rstrip() + "\n")
