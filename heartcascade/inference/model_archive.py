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

Every archive read here is treated as untrusted (documentation/checks.md, "Model archives"): every
manifest field is checked (dataset and configuration are names, never paths), only the members of the
layout above are accepted (no links, no other names), sizes and compression ratios are bounded while
unpacking, and everything unpacked is verified (checkpoints load with ``weights_only=True`` and build
their networks, plans version, channels and classes match the manifest, every JSON file parses and
every listed fold is there) before it replaces anything: an install unpacks into a staging folder and
swaps each fold folder in whole, so a failed or killed install leaves the installed model working.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from heartcascade.dataset.dataset_json import load_dataset
from heartcascade.inference.model_loading import (CHECKPOINT_KINDS, CONFIGURATIONS, checkpoint_file, load_fold,
                                                  model_dir_for, read_checkpoint, resolve_fold_dirs)
from heartcascade.inference.postprocessing import load_postprocessing
from heartcascade.paths import parse_dataset_id, results_root
from heartcascade.planning.plans import (PLANS_VERSION, check_override_keys, check_plans_version, load_plans,
                                        parse_plans, with_settings)
from heartcascade.utils.atomic import atomic_path, is_disk_full, replace_folder, restore_replaced_folders
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json, parse_json
from heartcascade.utils.processes import owner_tag
from heartcascade.utils.run_lock import run_lock
from heartcascade.utils.stale_temps import sweep, sweep_temp_files_of

MANIFEST = "heartcascade_model.json"
ARCHIVE_FORMAT = "heartcascade-model"
ARCHIVE_VERSION = 1
#: Checkpoint keys inference reads (documentation/conventions.md); the rest is training resume state.
INFERENCE_KEYS = ("format_version", "configuration", "plans", "networks")
#: Files copied from the configuration folder and from each fold folder when present.
CONFIGURATION_FILES = ("postprocessing.json", "plans.json", "dataset.json")
FOLD_FILES = ("plans.json", "dataset.json", "postprocessing.json")
SUMMARY_FILE = "validation_summary.json"

# Limits on what an archive may unpack to (a zip bomb ends in a one-line error, not a full disk).
#: Members in one archive (a 5-fold model has about 30).
MAX_MEMBERS = 1000
#: Bytes all members unpack to together (a 5-fold cascade at full width is well below 2 GiB).
MAX_UNPACKED_BYTES = 16 * 2**30
#: Unpacked / packed size of one member above 1 MiB (network weights pack about 1.1:1, JSON about 5:1).
MAX_COMPRESSION_RATIO = 50
_RATIO_FREE_BYTES = 2**20
_DATASET_NAME = re.compile(r"Dataset\d{3}_[A-Za-z0-9][A-Za-z0-9_-]*")
_FOLD_NAME = re.compile(r"0|[1-9]\d{0,2}|all")
_CHECKPOINT_NAME = re.compile(r"checkpoint_[A-Za-z0-9_-]{1,64}\.pth")


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
                 folds: Sequence[str | int] | None = None, checkpoint: str = "final",
                 inference_settings: Mapping[str, Any] | None = None) -> Path:
    """Write the weights-only archive of a trained model to ``output`` (atomically); returns its path.

    ``inference_settings``: fields of the plans' ``inference`` section the archive's model gets instead of
    the trained one's (e.g. test-time brightening chosen on validation scans after training); checked as the
    plans are, written into every fold's checkpoint and ``plans.json`` and listed in the manifest. The weights
    are unchanged.
    """
    output = Path(output)
    if output.suffix != ".zip":
        raise HCError(f"{output}: the model archive must end in .zip")
    if inference_settings:
        check_override_keys({"inference": dict(inference_settings)}, "inference_settings")
    model_dir = model_dir_for(dataset_id, configuration)
    dataset_name = model_dir.parent.name
    fold_dirs = resolve_fold_dirs(model_dir, folds)
    prefix = f"{dataset_name}/{configuration}"
    manifest: dict[str, Any] = {"format": ARCHIVE_FORMAT, "format_version": ARCHIVE_VERSION,
                                "dataset": dataset_name, "configuration": configuration,
                                "folds": [name for name, _ in fold_dirs], "checkpoint": checkpoint,
                                "heartcascade_version": _version(),
                                "exported": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if inference_settings:
        manifest["inference_settings"] = dict(inference_settings)
    figures: dict[str, dict[str, Any]] = {}
    sweep_temp_files_of(output)  # what an export killed before left beside the archive
    with atomic_path(output, suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in CONFIGURATION_FILES:
            if name == "plans.json" and inference_settings and (model_dir / name).is_file():
                typed_cfg = with_settings(load_plans(model_dir / name), {"inference": dict(inference_settings)},
                                          f"{model_dir / name} with inference_settings")
                zf.writestr(f"{prefix}/{name}", json.dumps(typed_cfg.to_dict(), indent=2) + "\n")
            elif (model_dir / name).is_file():
                zf.write(model_dir / name, f"{prefix}/{name}")
        for fold, folder in fold_dirs:
            path = checkpoint_file(folder, checkpoint)
            state = read_checkpoint(path)
            check_plans_version(state["plans"], path)
            if state["configuration"] != configuration:
                raise HCError(f"{path}: checkpoint is a '{state['configuration']}' model, not '{configuration}'")
            typed = parse_plans(state["plans"], str(path))
            if inference_settings:
                typed = with_settings(typed, {"inference": dict(inference_settings)}, f"{path} with inference_settings")
                state = {**state, "plans": typed.to_dict()}
            manifest.setdefault("plans_version", typed.plans_version)
            manifest.setdefault("preset", typed.report.preset)
            manifest.setdefault("num_input_channels", typed.num_input_channels)
            manifest.setdefault("num_classes", typed.num_classes)
            buffer = io.BytesIO()
            torch.save({k: state[k] for k in INFERENCE_KEYS if k in state}, buffer)
            zf.writestr(f"{prefix}/fold_{fold}/{path.name}", buffer.getvalue())
            for name in FOLD_FILES:
                if name == "plans.json" and inference_settings:
                    zf.writestr(f"{prefix}/fold_{fold}/{name}", json.dumps(typed.to_dict(), indent=2) + "\n")
                elif (folder / name).is_file():
                    zf.write(folder / name, f"{prefix}/fold_{fold}/{name}")
            summary = folder / "validation" / "summary.json"
            info: dict[str, Any] = {"mean_dice": _mean_dice(summary)}
            if summary.is_file():
                zf.write(summary, f"{prefix}/fold_{fold}/{SUMMARY_FILE}")
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


def _check_manifest(manifest: Any, archive: Path) -> dict[str, Any]:
    """Every field the installer or the predictor uses, checked; the dataset and configuration are names."""
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise HCError(f"{archive}: not a heartcascade model archive (no {MANIFEST}); make one with hc_export_model")
    if manifest.get("format_version") != ARCHIVE_VERSION:
        raise HCError(f"{archive}: model archive format_version {manifest.get('format_version')!r} is not "
                      f"{ARCHIVE_VERSION}; install the heartcascade release that wrote it")
    if manifest.get("plans_version") != PLANS_VERSION:
        raise HCError(f"{archive}: model has plans_version {manifest.get('plans_version')!r}, this heartcascade "
                      f"reads only {PLANS_VERSION}; install the heartcascade release the model was trained with")
    dataset = manifest.get("dataset")
    if not isinstance(dataset, str) or not _DATASET_NAME.fullmatch(dataset) or parse_dataset_id(dataset) < 1:
        raise HCError(f"{archive}: manifest 'dataset' must be a name like Dataset001_Name, got {str(dataset)[:80]!r}")
    if manifest.get("configuration") not in CONFIGURATIONS:
        raise HCError(f"{archive}: manifest 'configuration' must be one of {', '.join(CONFIGURATIONS)}, got "
                      f"{str(manifest.get('configuration'))[:80]!r}")
    folds = manifest.get("folds")
    if not isinstance(folds, list) or not folds or len(folds) > 100 or \
            not all(isinstance(f, str) and _FOLD_NAME.fullmatch(f) for f in folds) or len(set(folds)) != len(folds):
        raise HCError(f"{archive}: manifest 'folds' must be a list of distinct fold names such as [\"0\", \"1\"], "
                      f"got {str(folds)[:80]}")
    checkpoint = manifest.get("checkpoint", "final")
    if not isinstance(checkpoint, str) or (checkpoint not in CHECKPOINT_KINDS
                                           and not _CHECKPOINT_NAME.fullmatch(checkpoint)):
        raise HCError(f"{archive}: manifest 'checkpoint' must be final, best, latest or a checkpoint_*.pth name, "
                      f"got {str(checkpoint)[:80]!r}")
    manifest["checkpoint"] = checkpoint
    for key in ("num_input_channels", "num_classes"):
        value = manifest.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1000):
            raise HCError(f"{archive}: manifest '{key}' must be a positive integer, got {str(value)[:40]!r}")
    return manifest


def _allowed_member(name: str, prefix: str, folds: Sequence[str]) -> bool:
    """The archive layout (module docstring): nothing else may be unpacked."""
    if name in (MANIFEST, "README.md") or name in (prefix, prefix + "/"):
        return True
    if not name.startswith(prefix + "/"):
        return False
    parts = name[len(prefix) + 1:].split("/")
    if parts[-1] == "" and len(parts) == 2:  # a fold folder entry
        return parts[0].startswith("fold_") and parts[0][5:] in folds
    if len(parts) == 1:
        return parts[0] in CONFIGURATION_FILES
    if len(parts) == 2 and parts[0].startswith("fold_") and parts[0][5:] in folds:
        return parts[1] in FOLD_FILES + (SUMMARY_FILE,) or bool(_CHECKPOINT_NAME.fullmatch(parts[1]))
    return False


def _check_members(zf: zipfile.ZipFile, archive: Path, manifest: dict[str, Any]) -> list[zipfile.ZipInfo]:
    """The members to unpack, after the name, type, count, size and compression-ratio checks."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise HCError(f"{archive}: {len(infos)} members, a model archive has at most {MAX_MEMBERS}")
    prefix = f"{manifest['dataset']}/{manifest['configuration']}"
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        if name in seen:
            raise HCError(f"{archive}: member {name!r} appears twice")
        seen.add(name)
        if name.startswith("/") or ".." in name.split("/") or "\\" in name or \
                not _allowed_member(name, prefix, manifest["folds"]):
            raise HCError(f"{archive}: unexpected member {name!r} (everything must lie under {prefix}/ as "
                          "hc_export_model writes it)")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise HCError(f"{archive}: member {name!r} is a symbolic link; a model archive holds plain files only")
        if info.flag_bits & 0x1:
            raise HCError(f"{archive}: member {name!r} is encrypted")
        if info.file_size > _RATIO_FREE_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(1, info.compress_size):
            raise HCError(f"{archive}: member {name!r} unpacks to {info.file_size / 2**20:.0f} MiB from "
                          f"{info.compress_size / 2**20:.2f} MiB (more than {MAX_COMPRESSION_RATIO}:1); "
                          "refused as a possible zip bomb")
        total += info.file_size
    if total > MAX_UNPACKED_BYTES:
        raise HCError(f"{archive}: unpacks to {total / 2**30:.1f} GiB, more than the {MAX_UNPACKED_BYTES / 2**30:.0f} "
                      "GiB a model archive may hold")
    return [i for i in infos if i.filename not in (MANIFEST, "README.md") and not i.is_dir()]


def read_manifest(archive: str | os.PathLike) -> dict[str, Any]:
    """The archive's manifest, after checking its fields and every member (names, links, sizes)."""
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            if MANIFEST not in names:
                raise HCError(f"{archive}: not a heartcascade model archive (no {MANIFEST}); make one with "
                              "hc_export_model")
            info = zf.getinfo(MANIFEST)
            if info.file_size > 2**20:
                raise HCError(f"{archive}: {MANIFEST} is larger than 1 MiB")
            manifest = _check_manifest(parse_json(zf.read(MANIFEST), f"{archive}: {MANIFEST}"), archive)
            _check_members(zf, archive, manifest)
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
        raise HCError(f"{archive}: not a readable model archive ({' '.join(str(exc).split())[:160]})") from None
    return manifest


def _extract(archive: Path, manifest: dict[str, Any], dest: Path) -> Path:
    """Unpack the checked members into ``dest`` (counting the bytes as they come: a member's stated size is
    not trusted); returns the configuration folder there."""
    chunk = 2**20
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _check_members(zf, archive, manifest)
            need = sum(i.file_size for i in members)
            free = shutil.disk_usage(dest).free
            if need > free:
                raise HCError(f"no space left on device: {dest} (the model needs {need / 2**20:.0f} MiB, "
                              f"{free / 2**20:.0f} MiB free)")
            for info in members:
                target = dest.joinpath(*info.filename.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(info) as src, open(target, "xb") as out:
                    while block := src.read(chunk):
                        written += len(block)
                        if written > info.file_size:
                            raise HCError(f"{archive}: member {info.filename!r} holds more than its stated size")
                        out.write(block)
    except OSError as exc:
        if is_disk_full(exc, dest):
            raise HCError(f"no space left on device: {dest} (unpacking {archive})") from None
        raise HCError(f"{archive}: cannot unpack ({' '.join(str(exc).split())[:160]})") from None
    except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, zlib.error) as exc:
        raise HCError(f"{archive}: damaged member ({' '.join(str(exc).split())[:160]})") from None
    return dest / manifest["dataset"] / manifest["configuration"]


def verify_model(folder: Path, manifest: dict[str, Any], archive: Path) -> None:
    """Check an unpacked configuration folder against its manifest before anything uses it.

    Every listed fold is there with its checkpoint, which loads with ``weights_only=True``, is of the
    manifest's configuration and plans version and builds its networks; channels and classes agree
    between the manifest, the folds and their dataset.json; every JSON file parses and validates.
    """
    where = f"{archive}: {manifest['dataset']}/{manifest['configuration']}"
    channels, classes = manifest.get("num_input_channels"), manifest.get("num_classes")
    for fold in manifest["folds"]:
        fold_dir = folder / f"fold_{fold}"
        if not fold_dir.is_dir():
            raise HCError(f"{where}: fold {fold} is listed in {MANIFEST} but not in the archive")
        path = fold_dir / (manifest["checkpoint"] if manifest["checkpoint"].endswith(".pth")
                           else f"checkpoint_{manifest['checkpoint']}.pth")
        if not path.is_file():
            raise HCError(f"{where}: fold {fold} has no {path.name}")
        state = read_checkpoint(path)  # weights_only=True: a pickle payload is refused here
        label = f"{archive}: {path.relative_to(folder.parent.parent)}"
        if not isinstance(state["plans"], dict) or state["plans"].get("plans_version") != manifest["plans_version"]:
            version = state["plans"].get("plans_version") if isinstance(state["plans"], dict) else None
            raise HCError(f"{label}: checkpoint has plans_version {version!r}, the manifest says "
                          f"{manifest['plans_version']}")
        loaded = load_fold(fold_dir, path.name, configuration=manifest["configuration"])
        plans = loaded.plans
        channels = plans.num_input_channels if channels is None else channels
        classes = plans.num_classes if classes is None else classes
        if (plans.num_input_channels, plans.num_classes) != (channels, classes):
            raise HCError(f"{label}: model has {plans.num_input_channels} channel(s) and {plans.num_classes} "
                          f"classes, the archive says {channels} and {classes}")
        if (fold_dir / "dataset.json").exists():
            info = load_dataset(fold_dir)
            if (info.num_channels, info.num_classes) != (channels, classes):
                raise HCError(f"{archive}: {fold_dir.name}/dataset.json has {info.num_channels} channel(s) and "
                              f"{info.num_classes} classes, the model {channels} and {classes}")
        for name in ("plans.json",):
            if (fold_dir / name).exists():
                load_plans(fold_dir / name)
        for name in ("postprocessing.json",):
            if (fold_dir / name).exists():
                load_postprocessing(fold_dir / name)
        if (fold_dir / SUMMARY_FILE).exists() and not isinstance(load_json(fold_dir / SUMMARY_FILE), dict):
            raise HCError(f"{archive}: {fold_dir.name}/{SUMMARY_FILE} is not a JSON object")
    for name in CONFIGURATION_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name == "postprocessing.json":
            load_postprocessing(path)
        elif name == "plans.json":
            load_plans(path)
        else:
            load_dataset(folder)


def _unpack_verified(archive: Path, manifest: dict[str, Any], dest: Path) -> Path:
    folder = _extract(archive, manifest, dest)
    try:
        verify_model(folder, manifest, archive)
    except HCError as exc:  # name the archive and its member, not the staging folder
        text = str(exc).replace(f"{dest}{os.sep}", "")
        raise HCError(text if str(archive) in text else f"{archive}: {text}") from None
    return folder


def model_cache_root() -> Path:
    """Where ``hc_predict -m`` keeps unpacked archives: ``$HC_CACHE/models``, by default
    ``$TMPDIR/heartcascade-<uid>/models`` (a folder only this user may write)."""
    base = os.environ.get("HC_CACHE")
    root = Path(base) if base else Path(tempfile.gettempdir()) / f"heartcascade-{os.getuid()}"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(root)
    except OSError as exc:
        raise HCError(f"{root}: cannot create the model cache ({exc.strerror or exc}); set HC_CACHE to a "
                      "writable folder") from None
    if not base and (stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()):
        # in a shared temporary folder, another user could have prepared it
        raise HCError(f"{root}: model cache folder is not a folder of this user; set HC_CACHE to another one")
    cache = root / "models"
    cache.mkdir(exist_ok=True)
    return cache


def archive_key(archive: Path) -> str:
    """The archive's SHA-256 (first 32 hex digits): the cache folder's name."""
    h = hashlib.sha256()
    with open(archive, "rb") as fh:
        while block := fh.read(2**22):
            h.update(block)
    return h.hexdigest()[:32]


#: Unpacked models not used for this long are removed from the cache when another one is unpacked.
CACHE_MAX_AGE_S = 14 * 24 * 3600.0


@contextlib.contextmanager
def extracted_model(archive: str | os.PathLike) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The verified unpacked model of an archive, from the cache (unpacked on first use).

    Yields ``(configuration folder, manifest)``. The cache holds one folder per archive content
    (``model_cache_root()/<sha256>``), unpacked into a staging folder, verified and renamed in one step,
    so a killed run leaves only a staging folder that the next run removes.
    """
    archive = Path(archive)
    manifest = read_manifest(archive)
    try:
        key = archive_key(archive)
    except OSError as exc:
        raise HCError(f"{archive}: cannot read ({exc.strerror or exc})") from None
    cache = model_cache_root()
    entry = cache / key
    if not entry.is_dir():
        sweep(cache, ".hc_unpack_")  # staging folders of killed runs
        for old in cache.iterdir():  # models nobody used for a long time
            with contextlib.suppress(OSError):
                if not old.name.startswith(".") and time.time() - old.stat().st_mtime > CACHE_MAX_AGE_S:
                    shutil.rmtree(old, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".hc_unpack_{owner_tag()}_", dir=cache))
        try:
            _unpack_verified(archive, manifest, staging)
            try:
                os.rename(staging, entry)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # else another run unpacked it first
                    raise HCError(f"{entry}: cannot fill the model cache ({exc.strerror or exc})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.utime(entry)
    yield entry / manifest["dataset"] / manifest["configuration"], manifest


def install_model(archive: str | os.PathLike, overwrite: bool = False) -> Path:
    """Unpack an archive into ``HC_RESULTS/DatasetXXX_Name/<configuration>/``; returns that folder.

    Existing folds are kept unless ``overwrite``. Everything is unpacked into a staging folder and
    verified first; then each fold folder is swapped in whole (a reader never sees half of one, a kill
    leaves the old or the new fold) while holding the fold's lock (no install over a running training).
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
    resolved_root = root.resolve()
    if not target.resolve().is_relative_to(resolved_root):
        raise HCError(f"{target}: lies outside HC_RESULTS ({resolved_root}) once links are followed; refusing "
                      "to install there")
    if target.is_dir():  # what killed installs left: staging folders, a fold moved aside mid-swap
        sweep(target, ".hc_install_")
        restore_replaced_folders(target)
    clashes = [f"fold_{f}" for f in manifest["folds"] if (target / f"fold_{f}").exists()]
    if clashes and not overwrite:
        raise HCError(f"{target}: {', '.join(clashes)} already exist(s); pass --overwrite to replace")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HCError(f"{target}: cannot create ({exc.strerror or exc})") from None
    with contextlib.ExitStack() as locks:
        for fold in manifest["folds"]:
            locks.enter_context(run_lock(target / f"fold_{fold}", "a training or install of this fold"))
        staging = Path(tempfile.mkdtemp(prefix=f".hc_install_{owner_tag()}_", dir=target))
        try:
            unpacked = _unpack_verified(archive, manifest, staging)
            for fold in manifest["folds"]:
                replace_folder(unpacked / f"fold_{fold}", target / f"fold_{fold}")
            for item in sorted(unpacked.iterdir()):
                if item.is_file() and (overwrite or not (target / item.name).exists()):
                    os.replace(item, target / item.name)
        except OSError as exc:
            if is_disk_full(exc, target):
                raise HCError(f"no space left on device: {target}") from None
            raise HCError(f"{target}: install failed ({exc.strerror or exc}); the installed model is unchanged "
                          "where it was not replaced yet") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
