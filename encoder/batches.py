"""Training batches of (image, caption) pairs in which every image appears at most once, so
every off-diagonal pair is a true negative; optionally built from same-cluster blocks (hard
negatives). Shared by the TGDT trainer and the pooled global towers."""
from __future__ import annotations

import torch


def hard_order(clusters: torch.Tensor, block: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation of the images in shuffled blocks of `block` images from one cluster: a
    batch then holds a few groups of look-alikes (hard negatives for each other) among
    unrelated images, instead of almost only easy negatives."""
    blocks = []
    for c in torch.unique(clusters).tolist():
        members = torch.nonzero(clusters == c).squeeze(1)
        members = members[torch.randperm(len(members), generator=gen)]
        blocks += list(members.split(block))
    return torch.cat([blocks[i] for i in torch.randperm(len(blocks), generator=gen).tolist()])


def epoch_batches(images: torch.Tensor, caps_of: list[torch.Tensor], batch_size: int, gen: torch.Generator,
                  rounds: int | None = None, clusters: torch.Tensor | None = None, block: int = 0):
    """Rounds of (image, one of its captions); each batch holds an image at most once, so
    off-diagonal pairs are true negatives. rounds=None: every caption once per epoch.
    `clusters` + `block`: batches of same-cluster blocks (`hard_order`)."""
    full = rounds is None
    rounds = max(len(c) for c in caps_of) if full else rounds
    order = [c[torch.randperm(len(c), generator=gen)] for c in caps_of]
    for r in range(rounds):
        perm = hard_order(clusters, block, gen) if clusters is not None and block else \
            torch.randperm(len(images), generator=gen)
        if full:
            perm = torch.tensor([p for p in perm.tolist() if len(order[p]) > r], dtype=torch.long)
        for s in range(0, len(perm) - batch_size + 1, batch_size):
            sel = perm[s:s + batch_size]
            pick = [order[p][r % len(order[p])] if full else order[p][int(torch.randint(len(order[p]), (1,), generator=gen))]
                    for p in sel.tolist()]
            yield images[sel], torch.stack(pick)
