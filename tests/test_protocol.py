"""Protocol correctness on hand-made score matrices with known ranks."""
import numpy as np
import torch

from encoder.config import ScoreConfig
from encoder.evaluate import evaluate_embeddings
from encoder.heads import Embeddings
from encoder.protocol import ranks_full, ranks_two_stage, recall_table


def test_ranks_full_best_of_several_ground_truths():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],   # gt {1, 3}: best gt 0.3, two items above -> rank 2
                           [0.2, 0.8, 0.1, 0.0]])  # gt {1}: top -> rank 0
    gt = torch.tensor([[False, True, False, True], [False, True, False, False]])
    assert ranks_full(scores, gt).tolist() == [2, 0]


def test_two_stage_reranks_inside_candidates():
    glob = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    cand = torch.tensor([[0, 1, 2]])
    rerank = torch.tensor([[0.1, 0.2, 0.9]])  # gt item 2 moves to the top after re-rank
    gt = torch.tensor([[False, False, True, False]])
    assert ranks_two_stage(glob, cand, rerank, gt).tolist() == [0]


def test_ground_truth_missed_by_stage_one_ranks_after_candidates():
    # TGDT's released evaluation gives such a query rank 0 (a hit); it must rank after the K.
    glob = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.1]])
    cand = torch.tensor([[0, 1]])
    rerank = torch.tensor([[0.5, 0.4]])
    gt = torch.tensor([[False, False, False, True, False]])  # global rank 3, outside K=2
    r = ranks_two_stage(glob, cand, rerank, gt)
    assert r.tolist() == [3]  # K + 1 outside items (item 2) above it
    table = recall_table(np.array([0]), r)
    assert table["t2i_r1"] == 0.0


def test_recall_table_values():
    i2t = np.array([0, 1, 4, 9, 20])
    t2i = np.array([0, 0, 5, 30])
    t = recall_table(i2t, t2i)
    assert t["i2t_r1"] == 20.0 and t["i2t_r5"] == 60.0 and t["i2t_r10"] == 80.0
    assert t["t2i_r1"] == 50.0 and t["t2i_r5"] == 50.0 and t["t2i_r10"] == 75.0
    assert t["rsum"] == 335.0
    assert t["i2t_medr"] == 5.0


def _emb(vecs, tokens=None):
    g = torch.nn.functional.normalize(torch.tensor(vecs, dtype=torch.float32), dim=-1)
    tok = g[:, None, :] if tokens is None else tokens
    return Embeddings(g, tok, torch.ones(tok.shape[:2], dtype=torch.bool))


def test_evaluate_embeddings_modes_on_perfect_and_swapped_pairs():
    images = _emb([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # captions 0,1 -> image 0 ; caption 2 -> image 1 ; caption 3 -> image 2 (one caption is off)
    captions = _emb([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 0, 1]])
    owner = torch.tensor([0, 0, 1, 2])
    res = evaluate_embeddings(images, captions, owner, ScoreConfig(alpha=0.5), k=2)
    for mode in ("global", "two_stage", "exhaustive"):
        r = res[mode]
        assert r["t2i_r1"] == 75.0  # caption 2 ranks image 2 first
        assert r["i2t_r1"] == 100.0 * 2 / 3 or r["i2t_r1"] == 66.67
        assert r["seconds"] >= 0
    assert res["two_stage"]["k"] == 2
