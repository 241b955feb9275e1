"""Average nnU-Net-format probability folders into label maps, checking that their labels line up.

Why: ``nnUNetv2_ensemble`` averages the ``CASE.npz`` files of several folders channel by channel and
never checks that channel *i* means the same structure everywhere: two models whose ``dataset.json``
order LV and RV differently average LV with RV without a word. Here every folder's ``dataset.json``
(nnU-Net's ``nnUNetv2_predict`` writes one into its output folder; for a ``hc_predict
--nnunet-probabilities`` folder copy the model's) names its channels (labels sorted by value, nnU-Net's
channel order); folders with the same structures in another order are re-ordered to the first folder's,
folders with other structures are refused. The label maps use the first folder's label values (its
``label_codes`` when it has them, as ``hc_predict`` writes). Postprocessing is a separate step
(``hc_apply_postprocessing``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from heartcascade.dataset.image_io import Geometry, write_array
from heartcascade.inference.nnunet_interop import read_nnunet_probabilities
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json


@dataclass
class EnsembleReport:
    written: list[Path] = field(default_factory=list)
    reordered: dict[str, list[str]] = field(default_factory=dict)  # folder -> its channel order, when re-ordered


def channel_names(dataset_json: Mapping[str, Any], source: str) -> list[str]:
    """Structure names in channel order (labels sorted by value, as nnU-Net orders its softmax)."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise HCError(f"{source}: no 'labels' in dataset.json")
    if any(not isinstance(v, int) for v in labels.values()):
        raise HCError(f"{source}: region-based labels (lists of values) cannot be ensembled here")
    return [name for name, _ in sorted(labels.items(), key=lambda item: int(item[1]))]


def _folder_labels(folder: Path) -> tuple[list[str], dict[str, Any]]:
    path = folder / "dataset.json"
    if not path.is_file():
        raise HCError(f"{folder}: no dataset.json, so the label order of its probabilities is unknown (nnU-Net "
                      "writes one; for a hc_predict folder copy the model's dataset.json there)")
    data = dict(load_json(path))
    return channel_names(data, str(path)), data


def ensemble_folders(folders: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                     overwrite: bool = False) -> EnsembleReport:
    """Average the probabilities of the cases every folder holds; write ``OUT/CASE.nii.gz`` label maps."""
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise HCError("give at least two folders to ensemble")
    names, first_json = _folder_labels(folders[0])
    report = EnsembleReport()
    orders: list[np.ndarray] = []
    for folder in folders:
        theirs, _ = _folder_labels(folder)
        if sorted(theirs) != sorted(names):
            raise HCError(f"{folder}: labels {theirs} are not those of {folders[0]} ({names}); these models "
                          "segment different structures and cannot be averaged")
        if theirs != names:
            report.reordered[str(folder)] = theirs
        orders.append(np.array([theirs.index(n) for n in names]))
    cases = [sorted(p.name[:-4] for p in f.glob("*.npz")) for f in folders]
    common = set(cases[0]).intersection(*cases[1:])
    missing = {str(f): sorted(set(c) - common) for f, c in zip(folders, cases) if set(c) - common}
    if missing or not common:
        raise HCError(f"the folders do not hold the same cases (only in some: {missing})" if missing else
                      f"{folders[0]}: no CASE.npz probability files (predict with --save_probabilities)")
    values = sorted(int(v) for v in first_json["labels"].values())
    codes = {int(k): int(v) for k, v in (first_json.get("label_codes") or {}).items()}
    lookup = np.array([codes.get(v, v) for v in values])
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in sorted(common):
        out = out_dir / f"{case}.nii.gz"
        if out.exists() and not overwrite:
            raise HCError(f"{out}: exists (pass --overwrite)")
        total, properties = None, None
        for folder, order in zip(folders, orders):
            probabilities, props = read_nnunet_probabilities(folder / f"{case}.npz")
            if probabilities.shape[0] != len(names):
                raise HCError(f"{folder / case}.npz: {probabilities.shape[0]} channels, dataset.json names "
                              f"{len(names)} labels")
            probabilities = probabilities[order].astype(np.float32)
            if total is None:
                total, properties = probabilities, props
            elif probabilities.shape != total.shape:
                raise HCError(f"{folder / case}.npz: shape {probabilities.shape} differs from {total.shape} in "
                              f"{folders[0]}")
            else:
                total += probabilities
        assert total is not None and properties is not None
        stuff = properties["sitk_stuff"]
        geometry = Geometry(tuple(reversed(total.shape[1:])), tuple(stuff["spacing"]), tuple(stuff["origin"]),
                            tuple(stuff["direction"]))
        labels = lookup[np.argmax(total, axis=0)]
        dtype = np.uint8 if lookup.max() <= 255 else np.uint16 if lookup.max() <= 65535 else np.int32
        write_array(labels.astype(dtype), geometry, out)
        report.written.append(out)
    return report
