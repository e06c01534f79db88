"""Token codecs keep what MrSw needs: direction and length (caption tokens carry salience)."""
import numpy as np
import pytest

from indexer.tokenstore import TokenCodec


@pytest.mark.parametrize("form,max_len_err,min_cos", [("fp16", 1e-3, 0.9999), ("int8", 1e-2, 0.999), ("pq8", 1e-3, 0.9)])
def test_codec_round_trip_keeps_lengths_and_directions(form, max_len_err, min_cos):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= rng.uniform(0.02, 1.0, size=(len(x), 1)).astype(np.float32)  # salience-scaled tokens
    x[:4] = 0.0  # padding rows must stay zero and finite
    codec = TokenCodec(form, 32)
    if codec.needs_training:
        codec.train(x)
    codes = codec.encode(x)
    assert codes.shape == (len(x), codec.row_bytes)
    y = codec.decode(codes)
    assert np.isfinite(y).all() and np.abs(y[:4]).max() == 0.0
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    assert np.abs(nx - ny).max() < max_len_err
    cos = (x[4:] * y[4:]).sum(1) / (nx[4:] * ny[4:])
    assert cos.mean() > min_cos
