"""Finding and loading trained models (the model-folder contract of documentation/conventions.md).

``HC_RESULTS/DatasetXXX_Name/<configuration>/fold_<f>/checkpoint_{final,best,latest}.pth``; each
checkpoint holds ``format_version``, ``configuration``, ``plans`` and ``networks`` (state dicts), and
the networks are rebuilt from the plans with :mod:`heartcascade.model.from_plans`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from heartcascade.model import from_plans
from heartcascade.model.checkpoint import load_checkpoint
from heartcascade.paths import results_dataset_dir
from heartcascade.planning.plans import Plans, parse_plans
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json

CONFIGURATIONS = ("cascade", "baseline")
CHECKPOINT_KINDS = ("final", "best", "latest")
_FOLD_RE = re.compile(r"^fold_(\d+|all)$")


@dataclass
class LoadedFold:
    """One trained fold: its plans, configuration and networks (eval mode, on the CPU)."""

    name: str
    folder: Path | None
    configuration: str
    plans: Plans
    networks: dict[str, torch.nn.Module]
    dataset_json: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def model_dir_for(dataset_id: int | str, configuration: str) -> Path:
    """``HC_RESULTS/DatasetXXX_Name/<configuration>``; it must exist."""
    if configuration not in CONFIGURATIONS:
        raise HCError(f"unknown configuration {configuration!r}; expected one of {', '.join(CONFIGURATIONS)}")
    folder = results_dataset_dir(dataset_id) / configuration
    if not folder.is_dir():
        raise HCError(f"{folder}: no trained '{configuration}' model (train it first with hc_train)")
    return folder


def _is_fold_dir(folder: Path) -> bool:
    return any((folder / f"checkpoint_{k}.pth").is_file() for k in CHECKPOINT_KINDS)


def available_folds(model_dir: Path) -> list[str]:
    names = [m.group(1) for p in model_dir.iterdir() if p.is_dir() and (m := _FOLD_RE.match(p.name))]
    return sorted(names, key=lambda n: (n == "all", int(n) if n.isdigit() else 0))


def resolve_fold_dirs(model_dir: str | Path, folds: Sequence[str | int] | None = None) -> list[tuple[str, Path]]:
    """``[(fold_name, folder)]`` for the requested folds of a configuration folder.

    ``model_dir`` may also be a single ``fold_X`` folder (then ``folds`` must be empty). Without
    ``folds`` every numbered fold present is used; a model trained only as ``fold_all`` uses that one.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise HCError(f"{model_dir}: model folder not found")
    if _is_fold_dir(model_dir):
        if folds:
            raise HCError(f"{model_dir} is a single fold folder; do not pass -f with it (or pass its parent)")
        return [(model_dir.name.removeprefix("fold_"), model_dir)]
    present = available_folds(model_dir)
    if not folds:
        numbered = [f for f in present if f != "all"]
        chosen = numbered or present
        if not chosen:
            raise HCError(f"{model_dir}: no fold_<f> folders with checkpoints (train a fold first)")
    else:
        chosen = []
        for f in folds:
            name = str(f)
            if name != "all" and not name.isdigit():
                raise HCError(f"-f: folds are numbers or 'all', got {name!r}")
            name = name if name == "all" else str(int(name))
            if name not in present:
                raise HCError(f"{model_dir}: fold_{name} not found (available: {', '.join(present) or 'none'})")
            if name not in chosen:
                chosen.append(name)
    return [(name, model_dir / f"fold_{name}") for name in chosen]


def checkpoint_file(fold_dir: Path, kind: str) -> Path:
    """The checkpoint of a fold: ``kind`` is final/best/latest or a file name in the fold folder
    (nnU-Net's ``-chk checkpoint_final.pth`` spelling)."""
    is_name = kind.endswith(".pth") and Path(kind).name == kind
    if kind not in CHECKPOINT_KINDS and not is_name:
        raise HCError(f"--checkpoint must be one of {', '.join(CHECKPOINT_KINDS)} or a .pth file name in the "
                      f"fold folder, got {kind!r}")
    path = fold_dir / (kind if is_name else f"checkpoint_{kind}.pth")
    if not path.is_file():
        others = [k for k in CHECKPOINT_KINDS if (fold_dir / f"checkpoint_{k}.pth").is_file()]
        hint = f" (available: {', '.join(others)}; choose one with --checkpoint)" if others else ""
        raise HCError(f"{path}: checkpoint not found{hint}")
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    state = load_checkpoint(path, map_location="cpu")
    for key in ("configuration", "plans", "networks"):
        if key not in state:
            raise HCError(f"{path}: checkpoint lacks '{key}'")
    return state


def build_networks(configuration: str, plans: Plans) -> dict[str, torch.nn.Module]:
    """Fresh networks of a configuration, built from the plans (see model.from_plans)."""
    if configuration not in CONFIGURATIONS:
        raise HCError(f"unknown configuration {configuration!r}; expected one of {', '.join(CONFIGURATIONS)}")
    return dict(from_plans.build_networks(configuration, plans))


def load_fold(fold_dir: str | Path, checkpoint: str = "final", name: str | None = None,
              configuration: str | None = None) -> LoadedFold:
    """Load one fold folder's checkpoint and rebuild its networks (eval mode, CPU)."""
    fold_dir = Path(fold_dir)
    path = checkpoint_file(fold_dir, checkpoint)
    state = read_checkpoint(path)
    config = state["configuration"]
    if configuration is not None and config != configuration:
        raise HCError(f"{path}: checkpoint is a '{config}' model, not '{configuration}'")
    plans = parse_plans(state["plans"], str(path))
    networks = build_networks(config, plans)
    stored = state["networks"]
    for key, net in networks.items():
        if key not in stored:
            raise HCError(f"{path}: checkpoint has no weights for '{key}' (has {', '.join(stored) or 'none'})")
        try:
            net.load_state_dict(stored[key])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:160]
            raise HCError(f"{path}: weights of '{key}' do not fit the network built from its plans ({first})") from None
        net.eval()
    dataset_json = None
    if (fold_dir / "dataset.json").is_file():
        dataset_json = load_json(fold_dir / "dataset.json")
    return LoadedFold(name or fold_dir.name.removeprefix("fold_"), fold_dir, config, plans, networks, dataset_json)


def load_folds(model_dir: str | Path, folds: Sequence[str | int] | None = None, checkpoint: str = "final",
               configuration: str | None = None) -> list[LoadedFold]:
    loaded = [load_fold(folder, checkpoint, name, configuration)
              for name, folder in resolve_fold_dirs(model_dir, folds)]
    configs = {f.configuration for f in loaded}
    if len(configs) > 1:
        raise HCError(f"{model_dir}: folds mix configurations {sorted(configs)}")
    return loaded


def check_compatible_plans(a: Plans, b: Plans, where: Any) -> None:
    """Folds are averaged voxel by voxel, so they must share preprocessing, grids and classes."""
    keys = ("num_classes", "labels", "num_input_channels", "modality", "normalization", "full_resolution",
            "cropping")
    for key in keys:
        if getattr(a, key) != getattr(b, key):
            raise HCError(f"{where}: plans '{key}' differ from the first fold's; folds cannot be averaged")
    for section, sub in (("net1", "coarse_spacing"), ("net2", "K"), ("net2", "input_mode"),
                         ("baseline_unet", "spacing")):
        va = getattr(getattr(a, section), sub)
        vb = getattr(getattr(b, section), sub)
        if va != vb:
            raise HCError(f"{where}: plans '{section}.{sub}' differ from the first fold's ({va} vs {vb})")
