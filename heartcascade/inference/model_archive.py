"""Trained models as one zip file: export, install into ``HC_RESULTS``, or predict straight from it.

Why: a results folder holds gigabytes of resume state (optimizer moments, RNG states), logs and
validation predictions that nobody needs to *use* a model. The archive keeps only what inference reads
(each fold's networks, plans and ``dataset.json``, the configuration's ``postprocessing.json`` when
there is one), a ``README.md`` with the training figures and ``heartcascade_model.json`` (the manifest),
laid out exactly like the results folder::

    heartcascade_model.json
    README.md
    DatasetXXX_Name/<configuration>/postprocessing.json            (if present)
    DatasetXXX_Name/<configuration>/fold_<f>/checkpoint_<kind>.pth  (networks + plans only)
    DatasetXXX_Name/<configuration>/fold_<f>/plans.json, dataset.json, validation_summary.json
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from heartcascade.inference.model_loading import checkpoint_file, model_dir_for, read_checkpoint, resolve_fold_dirs
from heartcascade.paths import parse_dataset_id, results_root
from heartcascade.planning.plans import check_plans_version
from heartcascade.utils.atomic import atomic_path
from heartcascade.utils.errors import HCError

MANIFEST = "heartcascade_model.json"
ARCHIVE_FORMAT = "heartcascade-model"
ARCHIVE_VERSION = 1
#: Checkpoint keys inference reads (documentation/conventions.md); the rest is training resume state.
INFERENCE_KEYS = ("format_version", "configuration", "plans", "networks")
#: Files copied from the configuration folder and from each fold folder when present.
CONFIGURATION_FILES = ("postprocessing.json", "plans.json", "dataset.json")
FOLD_FILES = ("plans.json", "dataset.json", "postprocessing.json")


def _version() -> str:
    try:
        return version("heartcascade")
    except Exception:  # not installed (plain checkout on PYTHONPATH)
        return "unknown"


def _mean_dice(summary_path: Path) -> float | None:
    """Mean over structures of the fold's validation Dice, from ``validation/summary.json``."""
    try:
        summary = json.loads(summary_path.read_text())
        value = summary["aggregate"]["mean"]["dice"]["mean"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if value is not None and math.isfinite(value) else None


def _readme(manifest: dict[str, Any], figures: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"# heartcascade model: {manifest['dataset']} / {manifest['configuration']}",
        "",
        f"Exported {manifest['exported']} with heartcascade {manifest['heartcascade_version']} "
        f"(plans_version {manifest['plans_version']}, preset {manifest.get('preset')}); "
        f"checkpoint `{manifest['checkpoint']}` of each fold.",
        "",
        "| fold | curriculum steps | training cases | validation cases | validation mean Dice (structures) |",
        "|---|---|---|---|---|",
    ]
    for fold, info in figures.items():
        dice = "n/a" if info.get("mean_dice") is None else f"{info['mean_dice']:.4f}"
        lines.append(f"| {fold} | {info.get('steps', 'n/a')} | {info.get('num_training', 'n/a')} | "
                     f"{info.get('num_validation', 'n/a')} | {dice} |")
    lines += [
        "",
        "Use it:",
        "",
        "    hc_predict -i IMAGES -o OUTPUT -m this_file.zip        # straight from the zip",
        "    hc_install_model this_file.zip                         # or unpack into $HC_RESULTS, then",
        f"    hc_predict -i IMAGES -o OUTPUT -d {manifest['dataset']} -c {manifest['configuration']}",
        "",
    ]
    return "\n".join(lines)


def export_model(dataset_id: int | str, configuration: str, output: str | os.PathLike,
                 folds: Sequence[str | int] | None = None, checkpoint: str = "final") -> Path:
    """Write the weights-only archive of a trained model to ``output`` (atomically); returns its path."""
    output = Path(output)
    if output.suffix != ".zip":
        raise HCError(f"{output}: the model archive must end in .zip")
    model_dir = model_dir_for(dataset_id, configuration)
    dataset_name = model_dir.parent.name
    fold_dirs = resolve_fold_dirs(model_dir, folds)
    prefix = f"{dataset_name}/{configuration}"
    manifest: dict[str, Any] = {"format": ARCHIVE_FORMAT, "format_version": ARCHIVE_VERSION,
                                "dataset": dataset_name, "configuration": configuration,
                                "folds": [name for name, _ in fold_dirs], "checkpoint": checkpoint,
                                "heartcascade_version": _version(),
                                "exported": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    figures: dict[str, dict[str, Any]] = {}
    with atomic_path(output, suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in CONFIGURATION_FILES:
            if (model_dir / name).is_file():
                zf.write(model_dir / name, f"{prefix}/{name}")
        for fold, folder in fold_dirs:
            path = checkpoint_file(folder, checkpoint)
            state = read_checkpoint(path)
            check_plans_version(state["plans"], path)
            if state["configuration"] != configuration:
                raise HCError(f"{path}: checkpoint is a '{state['configuration']}' model, not '{configuration}'")
            manifest.setdefault("plans_version", state["plans"].get("plans_version"))
            manifest.setdefault("preset", state["plans"].get("preset"))
            buffer = io.BytesIO()
            torch.save({k: state[k] for k in INFERENCE_KEYS if k in state}, buffer)
            zf.writestr(f"{prefix}/fold_{fold}/{path.name}", buffer.getvalue())
            for name in FOLD_FILES:
                if (folder / name).is_file():
                    zf.write(folder / name, f"{prefix}/fold_{fold}/{name}")
            summary = folder / "validation" / "summary.json"
            info: dict[str, Any] = {"mean_dice": _mean_dice(summary)}
            if summary.is_file():
                zf.write(summary, f"{prefix}/fold_{fold}/validation_summary.json")
                try:
                    info["num_validation"] = json.loads(summary.read_text()).get("num_cases")
                except ValueError:
                    pass
            info["num_training"] = len(state.get("train_cases") or []) or None
            info.setdefault("num_validation", len(state.get("val_cases") or []) or None)
            info["steps"] = ",".join(str(s) for s in state.get("steps") or []) or None
            figures[fold] = {k: v for k, v in info.items() if v is not None}
        zf.writestr("README.md", _readme(manifest, figures))
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return output


def read_manifest(archive: str | os.PathLike) -> dict[str, Any]:
    """The archive's manifest, after checking that every member lies under its model folder."""
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            manifest = json.loads(zf.read(MANIFEST)) if MANIFEST in names else None
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise HCError(f"{archive}: not a readable model archive ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise HCError(f"{archive}: not a heartcascade model archive (no {MANIFEST}); make one with hc_export_model")
    if manifest.get("format_version") != ARCHIVE_VERSION:
        raise HCError(f"{archive}: model archive format_version {manifest.get('format_version')!r} is not "
                      f"{ARCHIVE_VERSION}; install the heartcascade release that wrote it")
    check_plans_version(manifest, archive)
    prefix = f"{manifest['dataset']}/{manifest['configuration']}/"
    for name in names:
        parts = Path(name).parts
        if name in (MANIFEST, "README.md"):
            continue
        if not name.startswith(prefix) or name.startswith("/") or ".." in parts:
            raise HCError(f"{archive}: unexpected member {name!r} (everything must lie under {prefix})")
    return manifest


def _extract(archive: Path, manifest: dict[str, Any], dest: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest, [n for n in zf.namelist() if n not in (MANIFEST, "README.md")])
    return dest / manifest["dataset"] / manifest["configuration"]


@contextlib.contextmanager
def extracted_model(archive: str | os.PathLike) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Unpack an archive into a temporary folder for the duration of a ``with`` block.

    Yields ``(configuration folder, manifest)``; the folder is removed afterwards.
    """
    archive = Path(archive)
    manifest = read_manifest(archive)
    with tempfile.TemporaryDirectory(prefix="hc_model_") as tmp:
        yield _extract(archive, manifest, Path(tmp)), manifest


def install_model(archive: str | os.PathLike, overwrite: bool = False) -> Path:
    """Unpack an archive into ``HC_RESULTS/DatasetXXX_Name/<configuration>/``; returns that folder.

    Existing folds are kept unless ``overwrite``; each fold folder is swapped in whole, so a reader
    never sees half of one.
    """
    archive = Path(archive)
    manifest = read_manifest(archive)
    dataset, configuration = manifest["dataset"], manifest["configuration"]
    dataset_id = parse_dataset_id(dataset)
    root = results_root()
    others = sorted(p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.name != dataset) \
        if root.is_dir() else []
    if others:
        raise HCError(f"{root}: dataset id {dataset_id} is already used by {', '.join(others)}; the archive "
                      f"holds {dataset}")
    target = root / dataset / configuration
    clashes = [f"fold_{f}" for f in manifest["folds"] if (target / f"fold_{f}").exists()]
    if clashes and not overwrite:
        raise HCError(f"{target}: {', '.join(clashes)} already exist(s); pass --overwrite to replace")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hc_install_", dir=target) as tmp:
        unpacked = _extract(archive, manifest, Path(tmp))
        for item in sorted(unpacked.iterdir()):
            destination = target / item.name
            if item.is_dir():
                old = None
                if destination.exists():
                    old = target / f".{item.name}.old"
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(destination, old)
                os.replace(item, destination)
                if old is not None:
                    shutil.rmtree(old)
            elif not destination.exists() or overwrite:
                os.replace(item, destination)
    return target
