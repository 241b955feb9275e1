"""Cross-validation splits and fold names.

``splits_final.json`` lives in the preprocessed dataset folder and is a JSON list with one entry per
fold, ``[{"train": [case ids], "val": [case ids]}, ...]``. When it is absent it is created as the
same seeded 5-fold split nnU-Net v2 creates for the same case ids (see :func:`make_kfold_splits`), so
fold ``i`` holds out the same cases in both tools and results compare fold by fold. Any other file of
the same shape is accepted
(e.g. the paper's single 15/5 split: one entry), either by putting it there or with ``hc_train
--splits FILE``.

Fold names: ``0``..``N-1``, ``fold0``..``foldN-1`` and ``all``. ``all`` trains on every case and has
no validation cases: with none held out, a validation Dice would be measured on training cases, and
keep-best and the postprocessing choice made on it would choose nothing (they are skipped, and the
training log says so). Train a numbered fold to get a held-out estimate.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json

SPLITS_FILE = "splits_final.json"
DEFAULT_NUM_FOLDS = 5
DEFAULT_SPLIT_SEED = 12345
Fold = Union[int, str]  # an int index or "all"


def make_kfold_splits(case_ids: Sequence[str], num_folds: int = DEFAULT_NUM_FOLDS,
                      seed: int = DEFAULT_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """Seeded k-fold split of ``case_ids``, identical to nnU-Net v2's default ``splits_final.json``.

    nnU-Net sorts the case ids, shuffles the positions ``0..n-1`` with ``numpy.random.RandomState(seed)``
    and cuts the shuffled positions into ``num_folds`` consecutive parts, the first ``n % num_folds``
    parts one case longer (scikit-learn's ``KFold(shuffle=True)``); part ``i`` is fold ``i``'s
    validation set. Both lists keep the sorted order. Reproducing those few lines spares a scikit-learn
    dependency; ``tests/data/nnunet_splits.json`` pins the result. With fewer cases than folds (where
    nnU-Net stops) every case becomes its own fold.
    """
    ids = sorted(set(str(c) for c in case_ids))
    if len(ids) < 2:
        raise HCError(f"cross-validation needs at least 2 training cases, found {len(ids)}")
    num_folds = min(int(num_folds), len(ids))
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(num_folds, len(ids) // num_folds)
    sizes[: len(ids) % num_folds] += 1
    splits = []
    start = 0
    for size in sizes:
        held_out = set(order[start:start + size].tolist())
        start += size
        splits.append({"train": [c for i, c in enumerate(ids) if i not in held_out],
                       "val": [c for i, c in enumerate(ids) if i in held_out]})
    return splits


def validate_splits(splits: object, case_ids: Sequence[str], source: str | Path) -> list[dict[str, list[str]]]:
    """Check the shape of a splits list and that it names only existing cases; return it normalised."""
    if not isinstance(splits, list) or not splits:
        raise HCError(f"{source}: expected a non-empty JSON list of {{'train': [...], 'val': [...]}} entries")
    known = set(case_ids)
    out = []
    for i, entry in enumerate(splits):
        if not isinstance(entry, dict) or not isinstance(entry.get("train"), list) \
                or not isinstance(entry.get("val"), list):
            raise HCError(f"{source}: entry {i} must be an object with lists 'train' and 'val'")
        train = [str(c) for c in entry["train"]]
        val = [str(c) for c in entry["val"]]
        if not train:
            raise HCError(f"{source}: fold {i} has no training cases")
        unknown = sorted((set(train) | set(val)) - known)
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise HCError(f"{source}: fold {i} names case(s) not in the preprocessed data: "
                          f"{', '.join(unknown[:5])}{more}")
        overlap = sorted(set(train) & set(val))
        if overlap:
            raise HCError(f"{source}: fold {i} has case(s) in both train and val: {', '.join(overlap[:5])}")
        out.append({"train": train, "val": val})
    return out


def load_or_create_splits(preprocessed_dir: str | Path, case_ids: Sequence[str],
                          splits_file: str | Path | None = None, write: bool = True,
                          seed: int = DEFAULT_SPLIT_SEED) -> tuple[list[dict[str, list[str]]], Path]:
    """The dataset's splits: ``splits_file`` if given, else ``splits_final.json`` (created if absent).

    ``write=False`` (non-zero DDP ranks) computes the same default split without writing it.
    """
    if splits_file is not None:
        path = Path(splits_file)
        return validate_splits(load_json(path), case_ids, path), path
    path = Path(preprocessed_dir) / SPLITS_FILE
    if path.is_file():
        return validate_splits(load_json(path), case_ids, path), path
    splits = make_kfold_splits(case_ids, DEFAULT_NUM_FOLDS, seed)
    if write:
        atomic_write_json(path, splits)
    return splits, path


def valid_fold_names(num_folds: int) -> list[str]:
    return [str(i) for i in range(num_folds)] + ["all"]


def parse_fold(value: str | int, num_folds: int) -> Fold:
    """``"fold0"``/``"0"``/``0`` → 0, ``"all"`` → ``"all"``; anything else → HCError listing valid names."""
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    match = re.fullmatch(r"(?:fold_?)?(\d+)", text)
    if match and int(match.group(1)) < num_folds:
        return int(match.group(1))
    names = ", ".join(valid_fold_names(num_folds))
    raise HCError(f"unknown fold {value!r}; valid folds are {names} (also written fold0..fold{num_folds - 1})")


def fold_folder_name(fold: Fold) -> str:
    return f"fold_{fold}"


def fold_cases(splits: list[dict[str, list[str]]], fold: Fold, case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training cases, validation cases) of ``fold``."""
    if fold == "all":
        return sorted(case_ids), []
    entry = splits[int(fold)]
    return list(entry["train"]), list(entry["val"])
