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


def _take(pool: list[str], n: int | None, default: int, what: str, warn: list[str]) -> list[str]:
    want = default if n is None else int(n)
    if want > len(pool):
        warn.append(f"{what}: requested {want}, only {len(pool)} available")
        want = len(pool)
    return pool[:want]


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

    Order of allocation: S_unknown first (the test cases; rotated by fold), then S_normal from
    the remaining normals, then S_mixture from what is left. S_normal and S_unknown never
    share a case (that would put training images in the test set). With ``mixture_overlap``
    S_mixture — unlabeled by construction — may reuse cases of S_normal (normals) and of
    S_unknown (abnormals) when the unused pool is too small: the paper's Table 1 sizes for RSNA
    exceed the 26,684 images of the data set, so its sets must overlap. Requested sizes larger
    than what is available are clipped, and the clipping is logged as a WARNING.

    Defaults (size None): S_unknown = 20 % of each class (at least 2), S_normal = half of the
    remaining normals (rounded up), S_mixture = the rest (normals) and all remaining abnormals.

    S_unknown is cut into val (``val_fraction``, for thresholds) and test. Returns lists of ids
    under keys ``normal``, ``mixture_normal``, ``mixture_abnormal``, ``val_normal``,
    ``val_abnormal``, ``test_normal``, ``test_abnormal``.
    """
    warn: list[str] = []
    normals = _rotated_permutation(normal_ids, seed, fold, n_folds)
    abnormals = _rotated_permutation(abnormal_ids, seed + 1, fold, n_folds)

    # Defaults keep two S_unknown cases per class (one val, one test) on tiny data sets.
    unk_n = _take(normals, sizes.n_unknown_normal,
                  min(max(2, len(normals) // 5), max(len(normals) - 1, 0)),
                  "S_unknown normal", warn)
    unk_a = _take(abnormals, sizes.n_unknown_abnormal, min(max(2, len(abnormals) // 5),
                  len(abnormals)), "S_unknown abnormal", warn)
    rest_n = normals[len(unk_n):]
    rest_a = abnormals[len(unk_a):]
    s_normal = _take(rest_n, sizes.n_normal, (len(rest_n) + 1) // 2, "S_normal", warn)
    free_n = rest_n[len(s_normal):]
    free_a = rest_a

    def mixture(free: list[str], reuse: list[str], n: int | None, what: str) -> list[str]:
        want = len(free) if n is None else int(n)
        picked = free[:want]
        if len(picked) < want and mixture_overlap:
            picked = picked + reuse[: want - len(picked)]
        if len(picked) < want:
            warn.append(f"{what}: requested {want}, only {len(picked)} available"
                        + ("" if mixture_overlap else " (data.mixture_overlap=false)"))
        elif want > len(free):
            log.info("%s: %d of %d cases reused from other sets (data.mixture_overlap=true)",
                     what, want - len(free), want)
        return picked

    mix_n = mixture(free_n, s_normal + unk_n, sizes.n_mixture_normal, "S_mixture normal")
    mix_a = mixture(free_a, unk_a, sizes.n_mixture_abnormal, "S_mixture abnormal")
    for w in warn:
        log.warning("Flow set sizes clipped — %s", w)

    def n_val(n: int) -> int:  # at least one val case of each class when there are two
        k = int(round(val_fraction * n))
        return max(k, 1) if val_fraction > 0 and n >= 2 else k

    n_val_n, n_val_a = n_val(len(unk_n)), n_val(len(unk_a))
    return {
        "normal": s_normal,
        "mixture_normal": mix_n,
        "mixture_abnormal": mix_a,
        "val_normal": unk_n[:n_val_n],
        "val_abnormal": unk_a[:n_val_a],
        "test_normal": unk_n[n_val_n:],
        "test_abnormal": unk_a[n_val_a:],
    }


def flow_index(normal_ids: Sequence[str], abnormal_ids: Sequence[str], cfg,
               make_items) -> dict:
    """The flow method's sets from the ``data`` config, as ``(split, group) -> items``.

    ``make_items(ids, label, labelled)`` builds the :class:`~datamodules.base.Item` list; for the
    mixture ``labelled`` is False (S_mixture is unlabeled by construction: no class or mask is
    passed on, and the order is shuffled so that it does not give the labels away either).
    """
    import random

    from datamodules.base import ABNORMAL, NORMAL, UNLABELED
    from datamodules.common import _cfg

    seed = int(_cfg(cfg, "split_seed", 0))
    sets = flow_sets(
        list(normal_ids), list(abnormal_ids),
        FlowSetSizes(_cfg(cfg, "n_normal", None), _cfg(cfg, "n_mixture_normal", None),
                     _cfg(cfg, "n_mixture_abnormal", None), _cfg(cfg, "n_unknown_normal", None),
                     _cfg(cfg, "n_unknown_abnormal", None)),
        seed=seed, fold=int(_cfg(cfg, "fold", 0)), n_folds=int(_cfg(cfg, "n_folds", 5)),
        mixture_overlap=bool(_cfg(cfg, "mixture_overlap", False)),
        val_fraction=float(_cfg(cfg, "val_fraction", 0.15)),
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
