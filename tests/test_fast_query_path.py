"""The serving fast path gives the same answers as the reference path it replaces:
ONNX text encoder vs PyTorch, coalesced vs single encodes, re-rank scored from stored rows vs
decoded padded blocks, and a calibrated nprobe that keeps its measured recall."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from encoder.heads import Embeddings
from encoder.similarity import local_from_flat
from indexer.tokenstore import SCORE_CHUNK, TokenCodec, pad_blocks

TEXTS = ["a dog runs on the beach", "Two children play in the snow while their mother watches from a bench",
         "", "a black cat sits", "word " * 80]


@pytest.fixture(scope="module")
def default_encoder():
    pytest.importorskip("onnxruntime")
    from encoder.pipeline import Encoder

    return Encoder.from_pretrained(device="cpu")


def test_onnx_text_encoder_equals_torch(default_encoder):
    enc = default_encoder
    assert enc.set_text_runtime("torch") == "torch"
    ref = enc.encode_texts(TEXTS)
    assert enc.set_text_runtime("onnx") == "onnx"
    try:
        got = enc.encode_texts(TEXTS)
        singles = [enc.encode_texts([t]) for t in TEXTS[:2]]  # the 8- and 16-word-slot graphs
    finally:
        enc.set_text_runtime("torch")
    assert torch.equal(got.mask, ref.mask)
    assert torch.allclose(got.global_, ref.global_, atol=1e-5)
    assert torch.allclose(got.tokens, ref.tokens, atol=1e-5)
    for i, one in enumerate(singles):
        n = int(ref.mask[i].sum())
        assert one.tokens.shape[1] == n
        assert torch.allclose(one.tokens[0], ref.tokens[i, :n], atol=1e-5)
        assert torch.allclose(one.global_[0], ref.global_[i], atol=1e-5)


def test_onnx_int8_is_close_and_bad_runtime_is_refused(default_encoder):
    enc = default_encoder
    ref = enc.encode_texts(TEXTS)
    assert enc.set_text_runtime("onnx-int8") == "onnx-int8"
    try:
        got = enc.encode_texts(TEXTS)
    finally:
        enc.set_text_runtime("torch")
    cos = (got.global_ * ref.global_).sum(-1)
    assert cos.min() > 0.98 and not torch.allclose(got.global_, ref.global_, atol=1e-5)
    with pytest.raises(ValueError, match="text runtime"):
        enc.set_text_runtime("tensorrt")


def test_tiny_text_backbone_stays_on_torch(tiny_checkpoint):
    from encoder.pipeline import Encoder

    enc = Encoder.from_pretrained(tiny_checkpoint, device="cpu")
    assert enc.set_text_runtime("onnx") == "torch"


def test_failed_export_falls_back_to_torch(default_encoder, monkeypatch):
    import encoder.onnx_text as onnx_text

    def broken(*a, **k):
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(onnx_text, "OnnxTextEncoder", broken)
    assert default_encoder.set_text_runtime("onnx") == "torch"
    assert default_encoder.encode_texts(["a dog"]).global_.shape[0] == 1


class SlowEncoder:
    """Each pass sleeps, so concurrent callers overlap; rows are a function of their text."""

    def __init__(self):
        self.calls: list[int] = []
        self.other = "passed through"

    def encode_texts(self, texts):
        self.calls.append(len(texts))
        time.sleep(0.05)
        if "boom" in texts:
            raise RuntimeError("encoder failed")
        n = [len(t.split()) or 1 for t in texts]
        T = max(n)
        tokens = torch.zeros(len(texts), T, 4)
        mask = torch.zeros(len(texts), T, dtype=torch.bool)
        for i, (t, k) in enumerate(zip(texts, n)):
            tokens[i, :k] = float(len(t))
            mask[i, :k] = True
        g = torch.tensor([[float(len(t))] * 4 for t in texts])
        return Embeddings(g, tokens, mask)


def _concurrently(fn, args):
    out, errs = [None] * len(args), [None] * len(args)

    def run(i):
        try:
            out[i] = fn(args[i])
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errs[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, errs


def test_coalescing_encoder_batches_concurrent_queries_and_keeps_rows_apart():
    from service.batching import CoalescingEncoder

    inner = SlowEncoder()
    enc = CoalescingEncoder(inner, max_batch=16)
    texts = [" ".join(["w"] * (i % 4 + 1)) + f" q{i}" for i in range(12)]
    out, errs = _concurrently(lambda t: enc.encode_texts([t]), texts)
    assert errs == [None] * 12
    assert sum(inner.calls) == 12 and len(inner.calls) < 12  # fewer passes than queries
    for t, e in zip(texts, out):
        n = len(t.split())
        assert e.tokens.shape == (1, n, 4) and bool(e.mask.all())  # the batch's padding is trimmed off
        assert float(e.global_[0, 0]) == len(t) and float(e.tokens[0, 0, 0]) == len(t)
    assert enc.other == "passed through"  # everything else reaches the wrapped encoder
    assert enc.encode_texts(["a", "b"]).global_.shape == (2, 4)  # batch calls go straight through


def test_coalescing_encoder_gives_every_waiter_the_failure():
    from service.batching import CoalescingEncoder

    enc = CoalescingEncoder(SlowEncoder(), max_batch=16)
    out, errs = _concurrently(lambda t: enc.encode_texts([t]), ["boom"] + ["fine"] * 5)
    assert isinstance(errs[0], RuntimeError)
    assert all(e is None or isinstance(e, RuntimeError) for e in errs)
    assert enc.encode_texts(["fine again"]).global_.shape == (1, 4)  # not stuck after a failure


@pytest.mark.parametrize("query_is_text", [True, False])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_local_from_flat_equals_padded_blocks(query_is_text, reduce, mrsw_one):
    g = torch.Generator().manual_seed(0)
    D = 8
    lengths = torch.tensor([3, 1, 5, 5, 2])
    flat = torch.nn.functional.normalize(torch.randn(int(lengths.sum()), D, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(6, D, generator=g), dim=-1)
    qm = torch.tensor([True] * 4 + [False] * 2)
    blocks, mask = pad_blocks(flat.numpy(), lengths.numpy())
    ref = mrsw_one(q, qm, torch.from_numpy(blocks), torch.from_numpy(mask), query_is_text, reduce)
    got = local_from_flat(q @ flat.T, qm, lengths, query_is_text, reduce)
    assert torch.allclose(got, ref, atol=1e-6)
    even = torch.tensor([5, 5, 5])  # the all-full fast path (image grids)
    flat2 = torch.nn.functional.normalize(torch.randn(15, D, generator=g), dim=-1)
    b2, m2 = pad_blocks(flat2.numpy(), even.numpy())
    ref2 = mrsw_one(q, qm, torch.from_numpy(b2), torch.from_numpy(m2), query_is_text, reduce)
    assert torch.allclose(local_from_flat(q @ flat2.T, qm, even, query_is_text, reduce), ref2, atol=1e-6)


@pytest.mark.parametrize("form", ["fp32", "fp16", "int8", "pq4"])
def test_codec_scores_equal_scores_of_decoded_rows(form):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * SCORE_CHUNK + 300, 16)).astype(np.float32)  # several chunks, a ragged last one
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codec = TokenCodec(form, 16)
    if codec.needs_training:
        codec.train(x)
    codes = codec.encode(x)
    q = torch.from_numpy(rng.normal(size=(5, 16)).astype(np.float32))
    ref = q @ torch.from_numpy(codec.decode(codes)).T
    assert torch.allclose(codec.scores(q, codes), ref, atol=1e-5)
    assert torch.allclose(codec.scores(q, codes[:7]), ref[:, :7], atol=1e-5)  # the buffer is reused: no stale rows
    assert codec.scores(q, codes[:0]).shape == (5, 0)


def test_calibrated_nprobe_reaches_its_recall():
    faiss = pytest.importorskip("faiss")
    from indexer import faiss_index
    from indexer.config import FaissParams

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(64, 32)).astype(np.float32)
    x = centers[rng.integers(0, 64, 20_000)] + 0.3 * rng.normal(size=(20_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(20_000, dtype=np.int64) + 7
    p = FaissParams(kind="ivf", factory="IVF256,Flat", nprobe=64, train_size=20_000)
    faiss.omp_set_num_threads(1)
    index = faiss_index.build_index(x, ids, p)
    q = x[rng.choice(20_000, 100, replace=False)] + 0.05 * rng.normal(size=(100, 32)).astype(np.float32)
    truth = faiss_index.exact_top([(x[:7000], ids[:7000]), (x[7000:], ids[7000:])], q, 50, step=4096)
    brute = ids[np.argsort(-(q @ x.T), axis=1)[:, :50]]
    assert all(set(a) == set(b) for a, b in zip(truth, brute))  # blockwise exact top-k is exact
    nprobe, recall = faiss_index.calibrate_nprobe(index, p, q, truth, target=0.95)
    assert 8 <= nprobe <= 64 and recall >= 0.95
    grid = [8, 12, 16, 24, 32, 48, 64]
    if nprobe > 8:  # the step below it on the x1.5 grid misses the target: nprobe is the smallest
        _, below = faiss_index.search(index, q, 50, p.model_copy(update={"nprobe": grid[grid.index(nprobe) - 1]}))
        assert np.mean([len(set(a) & set(b)) / 50 for a, b in zip(truth, below)]) < 0.95
    _, got = faiss_index.search(index, q, 50, p.model_copy(update={"nprobe": nprobe}))
    assert np.mean([len(set(a) & set(b)) / 50 for a, b in zip(truth, got)]) == pytest.approx(recall)
    strict, r1 = faiss_index.calibrate_nprobe(index, p, q, truth, target=1.0)
    assert strict >= nprobe and (r1 == 1.0 or strict == 64)
