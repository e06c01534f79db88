"""The text query path (MiniLM + text head) exported to ONNX and run by ONNX Runtime.

A search query is one short sentence: in PyTorch eager its cost is mostly per-op overhead and
unfused GEMMs over small matrices (~20 ms on one core for MiniLM-L6 + head); ONNX Runtime's
fused graph does the same arithmetic in well under half of that. The export happens in memory
when an `Encoder` is built with `text_runtime="onnx"` (no files to keep in step with the
checkpoint) and the outputs equal the PyTorch path to float rounding (tested).

Word compaction (dropping [CLS]/[SEP]/padding, as `backbones._compact` does) is computed from
the tokenizer's masks in NumPy and passed in as a gather index, so the graph has no sort.
"""
from __future__ import annotations

import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import HFText, TokenBatch, sentence_vector
from .heads import Embeddings


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _TextGraph(nn.Module):
    """(input ids, attention mask, word order, word mask) -> (global, tokens) of the text head."""

    def __init__(self, backbone: HFText, head: nn.Module):
        super().__init__()
        self.net, self.head, self.token_layer = backbone.net, head, backbone.token_layer

    def forward(self, input_ids, attention_mask, token_type_ids, order, word_mask):
        out = self.net(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                       output_hidden_states=self.token_layer is not None)
        h = out.last_hidden_state
        mask = word_mask.bool()

        def words(states):
            kept = torch.gather(states, 1, order.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
            return kept * mask.unsqueeze(-1).to(kept.dtype)
        ws = None if self.token_layer is None else words(out.hidden_states[self.token_layer])
        emb = self.head(TokenBatch(words(h), mask, word_states=ws))
        return emb.global_, emb.tokens, sentence_vector(h, attention_mask)


RUNTIMES = ("torch", "onnx", "onnx-int8")


class OnnxTextEncoder:
    """`int8`: weights quantised per output channel (ONNX Runtime dynamic quantisation): about
    twice as fast again for a short query; the embeddings move slightly (cosine ~0.997 to the
    float ones), so its retrieval cost is measured in BENCHMARKS.md before anyone picks it.

    The legacy exporter fixes the head's attention length at export, so there is one graph
    per word-slot bucket (8, 16, max_tokens): a query runs the smallest one that holds its
    words, and the masked slots change nothing (tested against PyTorch).
    """

    def __init__(self, backbone: HFText, head: nn.Module, threads: int | None = None, int8: bool = False):
        import onnxruntime as ort

        self.tokenizer, self.max_tokens = backbone.tokenizer, backbone.max_tokens
        self.content = backbone.content.cpu().numpy()
        self.buckets = sorted({min(b, self.max_tokens) for b in (8, 16, self.max_tokens)})
        graph = _TextGraph(backbone, head).eval()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        # no busy-waiting workers: a server's other threads (FAISS, HTTP) need those cycles
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.sessions = {}
        for T in self.buckets:
            model = _export(graph, self._feeds(["a sample caption for the export", "two"], T))
            self.sessions[T] = ort.InferenceSession(_quantize(model) if int8 else model, so,
                                                    providers=["CPUExecutionProvider"])

    def _feeds(self, texts: list[str], T: int | None = None) -> dict[str, np.ndarray]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens + 2,
                             return_tensors="np", return_special_tokens_mask=True)
        keep = enc["attention_mask"].astype(bool) & ~enc["special_tokens_mask"].astype(bool)
        lengths = np.minimum(np.maximum(keep.sum(1), 1), self.max_tokens)
        T = T or next(b for b in self.buckets if b >= int(lengths.max()))
        order = np.zeros((len(texts), T), np.int64)
        ranked = np.argsort(~keep, axis=1, kind="stable")[:, :T]
        order[:, : ranked.shape[1]] = ranked
        word_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64),
                "token_type_ids": enc.get("token_type_ids", np.zeros_like(enc["input_ids"])).astype(np.int64),
                "order": order, "word_mask": word_mask}

    def __call__(self, texts: list[str]) -> tuple[Embeddings, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The text head's embeddings, the sentence vectors (the label route's input), the
        content-word mask and the piece ids of the kept words, as `HFText.forward` gives them."""
        feeds = self._feeds(texts)
        glob, tokens, sentence = self.sessions[feeds["order"].shape[1]].run(None, feeds)
        T = int(feeds["word_mask"].sum(1).max())
        mask = feeds["word_mask"][:, :T].astype(bool)
        ids = np.take_along_axis(feeds["input_ids"], feeds["order"][:, :T], axis=1) * mask
        content = self.content[ids] & mask
        emb = Embeddings(torch.from_numpy(glob), torch.from_numpy(np.ascontiguousarray(tokens[:, :T])),
                         torch.from_numpy(mask))
        return emb, torch.from_numpy(sentence), torch.from_numpy(content), torch.from_numpy(ids)


def _export(graph: nn.Module, feeds: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    axes = {name: {0: "batch", 1: "length"} for name in ("input_ids", "attention_mask", "token_type_ids")}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX form
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape-dependent Python branches
            torch.onnx.export(graph, tuple(torch.from_numpy(v) for v in feeds.values()), buf,
                              input_names=list(feeds), output_names=["global", "tokens", "sentence"],
                              dynamic_axes={**axes, "order": {0: "batch"}, "word_mask": {0: "batch"},
                                            "global": {0: "batch"}, "tokens": {0: "batch"},
                                            "sentence": {0: "batch"}},
                              opset_version=17, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return buf.getvalue()


def _quantize(model: bytes) -> bytes:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        logging.disable(logging.WARNING)  # the quantiser logs advice for static (calibrated) quantisation
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.disable(logging.NOTSET)
        return dst.read_bytes()
