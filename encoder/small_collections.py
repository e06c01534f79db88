"""Training on a user's own collection: which photos train and which validate, the least it
takes, and the batch size and epochs a small collection gets.

A collection without `split` fields gets a validation split carved out of it: 10% of its
usable photos (captioned and readable), at least 8 and at most 1,000, picked by the SHA-256
of each image path, so the same photos validate on every run and on every machine, whatever
the line order of pairs.jsonl. A collection with a train split but no val split gets its val
carved out of the train photos the same way. Photos whose split names neither (say `test`)
are never trained or validated on.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from .data import CollectionError

VAL_FRACTION = 0.1
MIN_VAL_IMAGES = 8
MAX_VAL_IMAGES = 1000
MIN_TRAIN_IMAGES = 32  # a carved split needs MIN_TRAIN_IMAGES + MIN_VAL_IMAGES captioned photos
MIN_BATCHES_PER_ROUND = 4  # a small train set is cut into at least this many batches per round...
MIN_BATCH = 16  # ...of at least this many photos (fewer photos: one batch of them all)


class TooFewPairs(CollectionError):
    """A collection too small to train on, with how small and what it takes."""


@dataclass
class SplitPlan:
    splits: list[str]  # per image: train_split, val_split, or what it was (never trained on)
    carved: bool  # the val split was carved (no val split in the collection)
    train: int  # usable photos in each part
    val: int
    unused: int  # usable photos in neither (another split)
    val_images: list[str] = field(default_factory=list)  # the carved val photos (empty when not carved)

    def describe(self) -> str:
        where = "the collection's own split fields"
        if self.carved:
            where = (f"no val split in the collection: carved {self.val} photos ({self.val / (self.train + self.val):.0%}) "
                     "for validation, picked by a hash of each image path (the same on every run)")
        extra = f"; {self.unused} photos in other splits are not used" if self.unused else ""
        return f"training on {self.train} photos, validating on {self.val}: {where}{extra}"

    def log(self) -> dict:
        return {"carved": self.carved, "train_images": self.train, "val_images": self.val,
                "unused_images": self.unused, "carved_val": self.val_images}


def _path_hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def carved_val_size(n: int) -> int:
    """Photos held out for validation when `n` usable photos have no val split."""
    return min(MAX_VAL_IMAGES, max(MIN_VAL_IMAGES, round(VAL_FRACTION * n)))


def plan_split(images: list[str], splits: list[str], usable: list[bool], train_split: str = "train",
               val_split: str = "val") -> SplitPlan:
    """Which photo trains and which validates (see the module doc); TooFewPairs when the
    collection cannot give both parts enough photos. `usable`: readable and captioned."""
    has_train = any(ok and s == train_split for s, ok in zip(splits, usable))
    has_val = any(ok and s == val_split for s, ok in zip(splits, usable))
    # no train split: the photos without a split field train
    pool_name = train_split if has_train else ""
    pool = [i for i, (s, ok) in enumerate(zip(splits, usable)) if ok and s == pool_name]
    out = [train_split if (ok and s == pool_name) else s for s, ok in zip(splits, usable)]
    val_names: list[str] = []
    if not has_val:
        n_val = carved_val_size(len(pool))
        if len(pool) - n_val < MIN_TRAIN_IMAGES:
            what = f"with split {train_split!r}" if has_train else "without a 'split' field"
            raise TooFewPairs(
                f"too few captioned photos to train on: {len(pool)} readable photos with captions {what}; training "
                f"needs at least {MIN_TRAIN_IMAGES + MIN_VAL_IMAGES} ({MIN_TRAIN_IMAGES} to train on, "
                f"{MIN_VAL_IMAGES} held out for validation)")
        held = sorted(pool, key=lambda i: (_path_hash(images[i]), i))[:n_val]
        for i in held:
            out[i] = val_split
        val_names = sorted(images[i] for i in held)
    n_train = sum(1 for s, ok in zip(out, usable) if ok and s == train_split)
    n_val = sum(1 for s, ok in zip(out, usable) if ok and s == val_split)
    if n_train < 2 or n_val < 1:
        raise TooFewPairs(f"too few captioned photos to train on: {n_train} with split {train_split!r} and {n_val} "
                          f"with split {val_split!r} (readable, with captions); training needs at least 2 and 1")
    return SplitPlan(out, not has_val, n_train, n_val, sum(usable) - n_train - n_val, val_names)


def batch_size_for(n_train: int, batch_size: int) -> int:
    """The configured batch size, cut so a small train set still gives MIN_BATCHES_PER_ROUND
    batches per round (never below MIN_BATCH photos, nor above the train set)."""
    return max(1, min(batch_size, n_train, max(MIN_BATCH, n_train // MIN_BATCHES_PER_ROUND)))


def epochs_for(epochs: int, steps_per_epoch: int, min_steps: int) -> int:
    """The configured epochs, raised (to at most 4x) until the run takes `min_steps` optimizer
    steps: a small collection's epochs are a few steps each (min_steps=0: unchanged)."""
    if not min_steps or steps_per_epoch <= 0:
        return epochs
    return min(4 * epochs, max(epochs, math.ceil(min_steps / steps_per_epoch)))
