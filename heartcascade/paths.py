"""Where raw datasets, preprocessed data and trained models live.

Roots come from ``HC_RAW``, ``HC_PREPROCESSED`` and ``HC_RESULTS``. When a variable is unset we fall
back to a folder under ``~/heartcascade_data`` and say so once (one line on stderr), so that a first
run works without setup but nobody is surprised where gigabytes went. Raw datasets have the same
layout as nnU-Net v2's, so when ``HC_RAW`` is unset but ``nnUNet_raw`` is set, raw datasets are read
from there (also said once). Preprocessed data and models are never shared with nnU-Net's folders:
their contents differ.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from heartcascade.utils.errors import HCError

DEFAULT_BASE = Path.home() / "heartcascade_data"
_ENV = {"raw": "HC_RAW", "preprocessed": "HC_PREPROCESSED", "results": "HC_RESULTS"}
#: nnU-Net v2's variable read when ours is unset (only where the folder layouts are the same).
_NNUNET_ENV = {"raw": "nnUNet_raw"}
_announced: set[str] = set()
_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


def _root(kind: str) -> Path:
    var = _ENV[kind]
    value = os.environ.get(var)
    if value:
        return Path(value).expanduser()
    nnunet_var = _NNUNET_ENV.get(kind)
    nnunet_value = os.environ.get(nnunet_var) if nnunet_var else None
    if nnunet_value:
        if var not in _announced:
            _announced.add(var)
            print(f"heartcascade: {var} is not set, reading raw datasets from {nnunet_var}={nnunet_value}",
                  file=sys.stderr)
        return Path(nnunet_value).expanduser()
    path = DEFAULT_BASE / kind
    if var not in _announced:
        _announced.add(var)
        print(f"heartcascade: {var} is not set, using {path}", file=sys.stderr)
    return path


def raw_root() -> Path:
    return _root("raw")


def preprocessed_root() -> Path:
    return _root("preprocessed")


def results_root() -> Path:
    return _root("results")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 0 < int(dataset_id) < 1000:
        raise HCError(f"dataset id must be between 1 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise HCError(f"dataset name {name!r} may contain only letters, digits, '_' and '-'")
    return f"Dataset{int(dataset_id):03d}_{name}"


def parse_dataset_id(value: str | int) -> int:
    """Accept ``1``, ``"001"`` or ``"Dataset001_Name"``."""
    text = str(value)
    match = _DATASET_RE.match(text)
    if match:
        return int(match.group(1))
    try:
        return int(text)
    except ValueError:
        raise HCError(f"not a dataset id: {value!r} (expected e.g. 1 or Dataset001_Name)") from None


def find_dataset_name(dataset_id: int, root: Path | None = None) -> str | None:
    """The ``DatasetXXX_Name`` folder name for an id under ``root`` (raw root by default), if any."""
    root = raw_root() if root is None else root
    if not root.is_dir():
        return None
    matches = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(f"Dataset{int(dataset_id):03d}_"))
    if len(matches) > 1:
        raise HCError(f"{root}: several folders for dataset id {dataset_id}: {', '.join(matches)}")
    return matches[0] if matches else None


def raw_dataset_dir(dataset_id: int | str) -> Path:
    dataset_id = parse_dataset_id(dataset_id)
    name = find_dataset_name(dataset_id)
    if name is None:
        raise HCError(f"no raw dataset with id {dataset_id} in {raw_root()} (expected a folder Dataset{dataset_id:03d}_<Name>)")
    return raw_root() / name


def _derived_dir(root: Path, dataset_id: int | str, must_exist: bool) -> Path:
    dataset_id = parse_dataset_id(dataset_id)
    name = find_dataset_name(dataset_id, root)
    if name is None:
        name = find_dataset_name(dataset_id)
    if name is None:
        raise HCError(f"no dataset with id {dataset_id} in {raw_root()} or {root}")
    path = root / name
    if must_exist and not path.is_dir():
        raise HCError(f"{path} does not exist")
    return path


def preprocessed_dataset_dir(dataset_id: int | str, must_exist: bool = False) -> Path:
    return _derived_dir(preprocessed_root(), dataset_id, must_exist)


def results_dataset_dir(dataset_id: int | str, must_exist: bool = False) -> Path:
    return _derived_dir(results_root(), dataset_id, must_exist)
