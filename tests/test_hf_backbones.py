"""Any transformers folder on disk works as a backbone (here: tiny random ViT and BERT)."""
import shutil

import torch
from PIL import Image

from encoder.backbones import build_image_backbone, build_text_backbone, minilm_path
from encoder.config import BackboneConfig


def test_hf_vision_folder_gives_patch_tokens(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=48)
    ViTModel(cfg).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    bb = build_image_backbone(BackboneConfig(kind="hf-vision", path=str(tmp_path / "vit")))
    with torch.no_grad():
        out = bb(torch.stack([bb.preprocess(Image.new("RGB", (50, 40), "green"))] * 2))
    assert bb.grid == (4, 4) and bb.dim == 24
    assert out.tokens.shape == (2, 16, 24) and out.mask.all()  # CLS dropped, 4x4 patches kept


def test_hf_text_folder_gives_word_states(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, folder / name)
    bb = build_text_backbone(BackboneConfig(kind="hf-text", path=str(folder), max_tokens=4))
    with torch.no_grad():
        out = bb(["a dog", "a very long caption that will be cut"])
    assert bb.dim == 16
    assert out.mask.sum(1).tolist() == [2, 4]
    assert out.tokens.shape == (2, 4, 16)
