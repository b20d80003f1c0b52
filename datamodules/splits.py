"""Deterministic, patient-level splits shared by the data modules.

- :func:`patient_split`: Kim et al. 2023 — normal images 70/15/15 (train/val/test) by patient,
  abnormal images only in val/test, k-fold cross-validation by rotating which patients are
  val/test.
- :func:`flow_sets`: Shibata et al. 2021 — S_normal / S_mixture / S_unknown with configured
  sizes.

Both only see ids and labels (never image content) and depend on nothing but the seed and
the fold, so a split is reproducible from the config alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def _rotated_permutation(ids: Sequence[str], seed: int, fold: int, n_folds: int) -> list[str]:
    """Shuffle ``ids`` (sorted first, so input order does not matter) and rotate the result by
    ``fold / n_folds`` of its length."""
    ids = sorted(set(ids))
    perm = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    shift = (fold * len(perm)) // max(n_folds, 1)
    return perm[shift:] + perm[:shift]


def patient_split(
    patient_of: Sequence[str],
    is_normal: Sequence[bool],
    fold: int = 0,
    n_folds: int = 5,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
) -> list[tuple[str, str]]:
    """(split, group) per image: normal 70/15/15 by patient, abnormal only in val/test.

    Patients with only normal images are shuffled (seeded) and cut into train/val/test by
    ``fractions``; for fold k the order is rotated by k/n_folds, so with 5 folds and 15 % test
    the five test sets are disjoint. Patients with at least one abnormal image never enter
    train: they are split between val and test in the val:test ratio (again rotated per fold),
    and their normal images follow them. No patient is in two splits.
    """
    patient_of = [str(p) for p in patient_of]
    is_normal = [bool(v) for v in is_normal]
    if len(patient_of) != len(is_normal):
        raise ValueError("patient_of and is_normal must have the same length")
    f_train, f_val, f_test = fractions
    if min(fractions) < 0 or abs(f_train + f_val + f_test - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")

    has_abnormal: dict[str, bool] = {}
    for p, n in zip(patient_of, is_normal):
        has_abnormal[p] = has_abnormal.get(p, False) or not n
    normal_only = [p for p, a in has_abnormal.items() if not a]
    with_abnormal = [p for p, a in has_abnormal.items() if a]

    split_of: dict[str, str] = {}
    perm = _rotated_permutation(normal_only, seed, fold, n_folds)
    n_train = int(round(f_train * len(perm)))
    n_val = int(round(f_val * len(perm)))
    for i, p in enumerate(perm):
        split_of[p] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    perm = _rotated_permutation(with_abnormal, seed + 1, fold, n_folds)
    n_val = int(round(f_val / max(f_val + f_test, 1e-12) * len(perm)))
    for i, p in enumerate(perm):
        split_of[p] = "val" if i < n_val else "test"

    return [
        (split_of[p], "normal" if n else "abnormal") for p, n in zip(patient_of, is_normal)
    ]


@dataclass(frozen=True)
class FlowSetSizes:
    """Requested sizes (None = default share of what is available)."""

    n_normal: int | None = None
    n_mixture_normal: int | None = None
    n_mixture_abnormal: int | None = None
    n_unknown_normal: int | None = None
    n_unknown_abnormal: int | None = None


def _scaled(asked: dict[str, int], available: int, what: str) -> dict[str, int]:
    """Sizes of sets that must be disjoint and share one pool: as asked when they fit, else
    every set scaled down by the same factor (floor), logged as asked -> given."""
    total = sum(asked.values())
    if total <= available:
        return dict(asked)
    f = available / total
    given = {k: int(v * f) for k, v in asked.items()}
    log.warning("Flow set sizes scaled down (%s: %d asked, %d available, factor %.4f): %s",
                what, total, available, f,
                ", ".join(f"{k} {asked[k]} -> {given[k]}" for k in asked))
    return given


def flow_sets(
    normal_ids: Sequence[str],
    abnormal_ids: Sequence[str],
    sizes: FlowSetSizes,
    seed: int = 0,
    fold: int = 0,
    n_folds: int = 5,
    mixture_overlap: bool = False,
    val_fraction: float = 0.15,
) -> dict[str, list[str]]:
    """S_normal / S_mixture / S_unknown of Shibata et al. 2021 (section 3, Table 1).

    Invariant: no case of S_unknown (val + test) is in S_normal or S_mixture — the models never
    see a case they are evaluated on. Training sets may share cases with each other: with
    ``mixture_overlap`` the normals of S_mixture are taken from the unused normals first, then
    from S_normal (the paper's S_mixture shares 6,529 of its 6,553 normals with S_normal).

    Order of allocation: S_unknown first (the test cases; rotated by fold), then S_normal from
    the remaining normals, then S_mixture from what is left. When the requested sizes of the
    sets that must be disjoint exceed a class's cases (the paper's RSNA Table 1 sums to
    29,684 images, more than the 26,684 stage-2 training images; see ``data.extra_class_csv``),
    those sets are scaled down by one common factor and the WARNING says what was asked and
    what was given.

    Defaults (size None): S_unknown = 20 % of each class (at least 2), S_normal = half of the
    remaining normals (rounded up), S_mixture = the rest (normals) and all remaining abnormals.

    S_unknown is cut into val (``val_fraction``, for thresholds) and test. Returns lists of ids
    under keys ``normal``, ``mixture_normal``, ``mixture_abnormal``, ``val_normal``,
    ``val_abnormal``, ``test_normal``, ``test_abnormal``.
    """
    normals = _rotated_permutation(normal_ids, seed, fold, n_folds)
    abnormals = _rotated_permutation(abnormal_ids, seed + 1, fold, n_folds)
    n_n, n_a = len(normals), len(abnormals)

    # Defaults keep two S_unknown cases per class (one val, one test) on tiny data sets.
    unk_n = sizes.n_unknown_normal
    unk_n = min(max(2, n_n // 5), max(n_n - 1, 0)) if unk_n is None else int(unk_n)
    unk_a = sizes.n_unknown_abnormal
    unk_a = min(max(2, n_a // 5), n_a) if unk_a is None else int(unk_a)
    s_norm = (max(n_n - unk_n, 0) + 1) // 2 if sizes.n_normal is None else int(sizes.n_normal)
    mix_n = sizes.n_mixture_normal
    mix_a = sizes.n_mixture_abnormal
    if mixture_overlap or mix_n is None:  # mixture normals need no cases of their own
        k = _scaled({"S_normal": s_norm, "S_unknown normal": unk_n}, n_n, "normal cases")
        s_norm, unk_n = k["S_normal"], k["S_unknown normal"]
    else:
        k = _scaled({"S_normal": s_norm, "S_mixture normal": int(mix_n),
                     "S_unknown normal": unk_n}, n_n, "normal cases")
        s_norm, mix_n, unk_n = k["S_normal"], k["S_mixture normal"], k["S_unknown normal"]
    if mix_a is not None:
        k = _scaled({"S_mixture abnormal": int(mix_a), "S_unknown abnormal": unk_a}, n_a,
                    "abnormal cases")
        mix_a, unk_a = k["S_mixture abnormal"], k["S_unknown abnormal"]
    else:
        unk_a = min(unk_a, n_a)

    unknown_n, rest_n = normals[:unk_n], normals[unk_n:]
    unknown_a, rest_a = abnormals[:unk_a], abnormals[unk_a:]
    s_normal = rest_n[:s_norm]
    free_n = rest_n[s_norm:]
    mix_n = len(free_n) if mix_n is None else int(mix_n)
    mixture_normal = free_n[:mix_n]
    if len(mixture_normal) < mix_n:  # only with mixture_overlap: reuse S_normal, never S_unknown
        reuse = min(mix_n - len(mixture_normal), len(s_normal))
        mixture_normal = mixture_normal + s_normal[:reuse]
        log.info("S_mixture normal: %d of %d cases shared with S_normal "
                 "(data.mixture_overlap=true; the paper's sets share them too)",
                 reuse, len(mixture_normal))
        if len(mixture_normal) < mix_n:
            log.warning("Flow set sizes clipped — S_mixture normal: requested %d, only %d "
                        "available", mix_n, len(mixture_normal))
    mixture_abnormal = rest_a if mix_a is None else rest_a[:int(mix_a)]

    def n_val(n: int) -> int:  # at least one val case of each class when there are two
        k = int(round(val_fraction * n))
        return max(k, 1) if val_fraction > 0 and n >= 2 else k

    n_val_n, n_val_a = n_val(len(unknown_n)), n_val(len(unknown_a))
    sets = {
        "normal": s_normal,
        "mixture_normal": mixture_normal,
        "mixture_abnormal": mixture_abnormal,
        "val_normal": unknown_n[:n_val_n],
        "val_abnormal": unknown_a[:n_val_a],
        "test_normal": unknown_n[n_val_n:],
        "test_abnormal": unknown_a[n_val_a:],
    }
    held_out = set(unknown_n) | set(unknown_a)
    trained = set(s_normal) | set(mixture_normal) | set(mixture_abnormal)
    assert not held_out & trained, "flow_sets: S_unknown overlaps a training set"  # invariant
    return sets


class SplitLeakError(ValueError):
    """A validation / test case (patient) also appears in a training set."""


def check_disjoint(index: dict, by_patient: bool = True) -> None:
    """Raise :class:`SplitLeakError` if a case of val or test is in a training set, or a case
    is in both val and test.

    A case is the item's patient id (``Item.group_id``) when ``by_patient`` — two images of one
    patient must not straddle train and val/test — else the item's resolved file path (the
    folder layout has no patient ids: the same file linked or copied under two names is what
    can be caught there). Training sets may share cases with each other (S_normal / S_mixture).
    The message names item paths, never patient ids (they can be identifiers).
    """
    import os

    def key(it) -> str:
        return it.group_id if by_patient and it.group_id else os.path.realpath(it.path)

    where: dict[str, dict[str, str]] = {"train": {}, "val": {}, "test": {}}
    for (split, group), items in index.items():
        for it in items:
            where[split].setdefault(key(it), f"{it.path} ({split}/{group})")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sorted(set(where[a]) & set(where[b]))
        if both:
            eg = "; ".join(f"{where[a][k]} and {where[b][k]}" for k in both[:3])
            what = "patient(s)" if by_patient else "file(s)"
            raise SplitLeakError(
                f"{len(both)} {what} in both {a} and {b}, e.g. {eg}. A {b} case must never be "
                f"in {a}: fix the data layout or labels so each {what[:-3]} is in one split.")


def flow_index(normal_ids: Sequence[str], abnormal_ids: Sequence[str], cfg,
               make_items) -> dict:
    """The flow method's sets from the ``data`` config, as ``(split, group) -> items``.

    ``make_items(ids, label, labelled)`` builds the :class:`~datamodules.base.Item` list; for the
    mixture ``labelled`` is False (S_mixture is unlabeled by construction: no class or mask is
    passed on, and the order is shuffled so that it does not give the labels away either).
    """
    import random

    from datamodules.base import ABNORMAL, NORMAL, UNLABELED
    from datamodules.config import data_config

    cfg = data_config(cfg)

    seed = int(cfg.split_seed)
    sets = flow_sets(
        list(normal_ids), list(abnormal_ids),
        FlowSetSizes(cfg.n_normal, cfg.n_mixture_normal,
                     cfg.n_mixture_abnormal, cfg.n_unknown_normal,
                     cfg.n_unknown_abnormal),
        seed=seed, fold=int(cfg.fold), n_folds=int(cfg.n_folds),
        mixture_overlap=bool(cfg.mixture_overlap),
        val_fraction=float(cfg.val_fraction),
    )
    mixture = sorted(sets["mixture_normal"] + sets["mixture_abnormal"])
    random.Random(seed).shuffle(mixture)
    return {
        ("train", "normal"): make_items(sets["normal"], NORMAL, True),
        ("train", "mixture"): make_items(mixture, UNLABELED, False),
        ("val", "normal"): make_items(sets["val_normal"], NORMAL, True),
        ("val", "abnormal"): make_items(sets["val_abnormal"], ABNORMAL, True),
        ("test", "normal"): make_items(sets["test_normal"], NORMAL, True),
        ("test", "abnormal"): make_items(sets["test_abnormal"], ABNORMAL, True),
    }
