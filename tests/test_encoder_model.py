"""Checkpoint round trip, offline backbones, bad images, CLI errors."""
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.backbones import TokenBatch
from encoder.config import BackboneConfig
from encoder.model import CheckpointError, TGDTModel
from encoder.pipeline import Encoder
from encoder.transforms import ImageError, load_image


def test_checkpoint_round_trip_gives_identical_embeddings(tiny_checkpoint, tmp_path):
    enc = Encoder.from_pretrained(tiny_checkpoint, device="cpu")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    a_img, a_txt = enc.encode_images([img]), enc.encode_texts(["a dog runs on the beach", "snow"])
    enc.model.save_pretrained(tmp_path / "copy")
    enc2 = Encoder.from_pretrained(tmp_path / "copy", device="cpu")
    b_img, b_txt = enc2.encode_images([img]), enc2.encode_texts(["a dog runs on the beach", "snow"])
    assert torch.equal(a_img.global_, b_img.global_) and torch.equal(a_img.tokens, b_img.tokens)
    assert torch.equal(a_txt.global_, b_txt.global_) and torch.equal(a_txt.mask, b_txt.mask)
    assert torch.allclose(a_img.global_.norm(dim=-1), torch.ones(1))
    assert a_txt.mask.sum(1).tolist() == [6, 1]
    assert (tmp_path / "copy" / "model.safetensors").is_file() and (tmp_path / "copy" / "config.json").is_file()


def test_bad_checkpoint_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        TGDTModel.from_pretrained(tmp_path)


def test_real_backbones_load_offline_and_give_documented_shapes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from encoder.backbones import build_image_backbone, build_text_backbone

    ib = build_image_backbone(BackboneConfig(kind="efficientnet-lite0"))
    with torch.no_grad():
        out = ib(torch.stack([ib.preprocess(Image.new("RGB", (300, 200), "blue"))]))
    assert out.tokens.shape == (1, 49, 1280) and ib.grid == (7, 7)
    tb = build_text_backbone(BackboneConfig(kind="minilm", max_tokens=8))
    with torch.no_grad():
        t = tb(["A dog.", "one two three four five six seven eight nine ten eleven"])
    assert t.tokens.shape[0] == 2 and t.tokens.shape[2] == 384
    assert t.mask.sum(1).tolist() == [3, 8]  # [CLS]/[SEP] dropped; long caption truncated to max_tokens


def _png(mode, size=(20, 10)):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "1", "CMYK"])
def test_any_mode_becomes_rgb(mode):
    img = load_image(_png(mode))
    assert img.mode == "RGB" and img.size == (20, 10)


def test_exif_orientation_is_applied():
    buf = io.BytesIO()
    im = Image.new("RGB", (40, 20), "red")
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    im.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"this is not an image at all", "not a readable image"),
    (_png("RGB", (64, 64))[:60], "corrupt|truncated|not a readable"),
])
def test_bad_bytes_give_clear_errors(data, match):
    with pytest.raises(ImageError, match=match):
        load_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # tiny file, 400 megapixels
    with pytest.raises(ImageError, match="too large"):
        load_image(buf.getvalue())


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")


def test_cli_user_mistakes_exit_2_with_one_line(tmp_path):
    data = tmp_path / "col"
    data.mkdir()
    (data / "pairs.jsonl").write_text('{"image": "x.jpg", "captions": ["a dog"]}\n')
    r = subprocess.run([sys.executable, "-m", "encoder.cli", "evaluate", "--checkpoint", str(tmp_path),
                        "--data", str(data)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "not a checkpoint folder" in r.stderr
