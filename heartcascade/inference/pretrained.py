"""The pretrained model shipped with the package, and loading any trained model's weights by path.

Why: ``hc_predict -i IN -o OUT`` should segment cine MR without training first, and ``hc_train
--pretrained MODEL`` should start from any trained model however it is stored (an exported zip, an
installed model folder, a fold folder or one checkpoint file).

The shipped model lives at ``heartcascade/pretrained/<DEFAULT_MODEL_NAME>.zip`` (an :mod:`hc_export_model
<heartcascade.inference.model_archive>` archive) with its model card ``<DEFAULT_MODEL_NAME>.json`` beside
it: what it was trained on, the recipe, its measured Dice, its limits, and the ``input`` it accepts
(modality, channels, fewest slices) that :mod:`heartcascade.inference.input_check` enforces.
``scripts/train_pretrained.py`` rebuilds both. The environment variable ``HC_DEFAULT_MODEL`` (a model
zip; its card is the ``.json`` of the same name, else the shipped card) replaces it, e.g. for a site's
own default model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from heartcascade.inference.model_archive import extracted_model
from heartcascade.inference.model_loading import (LoadedFold, available_folds, load_fold, read_checkpoint,
                                                  resolve_fold_dirs)
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json

#: Package-data folder of the shipped model (declared in setup.py, so the wheel carries it).
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
DEFAULT_MODEL_NAME = "cine_mr_lv_myo_rv"
DEFAULT_MODEL_ENV = "HC_DEFAULT_MODEL"


def default_model_path() -> Path:
    """The zip ``hc_predict`` uses without ``-d``/``-m``: ``$HC_DEFAULT_MODEL``, else the shipped one
    (which may be absent in a checkout where it was not trained yet)."""
    override = os.environ.get(DEFAULT_MODEL_ENV)
    return Path(override) if override else PRETRAINED_DIR / f"{DEFAULT_MODEL_NAME}.zip"


def model_card_path(model: Path | None = None) -> Path:
    """The card beside ``model`` (same name, ``.json``), else the shipped card."""
    model = default_model_path() if model is None else Path(model)
    beside = model.with_suffix(".json")
    return beside if beside.is_file() else PRETRAINED_DIR / f"{DEFAULT_MODEL_NAME}.json"


def model_card(model: Path | None = None) -> dict[str, Any]:
    """The model card (``{}`` when there is none)."""
    path = model_card_path(model)
    return dict(load_json(path)) if path.is_file() else {}


def default_model() -> tuple[Path, dict[str, Any]]:
    """``(zip, card)`` of the default model; a clear error when it is missing."""
    path = default_model_path()
    if not path.is_file():
        source = f"${DEFAULT_MODEL_ENV}" if os.environ.get(DEFAULT_MODEL_ENV) else "this installation"
        raise HCError(f"{path}: no default model in {source} (train one with scripts/train_pretrained.py, "
                      "or pass -d DATASET / -m MODEL)")
    return path, model_card(path)


def describe(card: dict[str, Any]) -> str:
    """One line saying what the model is for (used in messages and refusals)."""
    return str(card.get("purpose") or card.get("name") or "the default model")


def _load_from_folder(folder: Path, checkpoint: str, source: Path) -> LoadedFold:
    """One fold of a configuration folder: ``fold_all`` when present, else the first numbered fold."""
    try:
        fold_dirs = resolve_fold_dirs(folder)
    except HCError:
        raise HCError(f"{source}: not a trained model (no checkpoint_*.pth, no fold_<f>/ folders)") from None
    if len(fold_dirs) > 1 and "all" in available_folds(folder):
        fold_dirs = resolve_fold_dirs(folder, ["all"])
    name, fold_dir = fold_dirs[0]
    return load_fold(fold_dir, checkpoint, name)


def load_model_weights(source: str | os.PathLike, checkpoint: str = "final") -> LoadedFold:
    """The networks and plans of a trained model: a model zip, a configuration folder (``fold_all``,
    else its first fold), a fold folder, a ``.pth`` checkpoint file, or ``default`` (the model
    ``hc_predict`` uses without ``-d``/``-m``: fine-tuning it on one's own centre's scans)."""
    if str(source) == "default":
        source, _ = default_model()
    source = Path(source)
    if not source.exists():
        raise HCError(f"{source}: pretrained model not found (a model .zip, a model folder or a .pth file)")
    if source.is_file() and source.suffix == ".zip":
        with extracted_model(source) as (folder, manifest):
            return _load_from_folder(folder, manifest["checkpoint"], source)
    if source.is_file():
        return load_fold(source.parent, source.name, source.stem)  # a checkpoint file: the name picks it
    return _load_from_folder(source, checkpoint, source)
