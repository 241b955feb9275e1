"""The benchmark's inputs: raw datasets in the benchmark's own data roots, and the files to predict.

* ``ct`` (full): CT images synthesised at full size around the MM-WHS label maps ``ct_train_1002``
  (512 x 512 x 239, 0.488 x 0.488 x 0.625 mm) and ``ct_train_1012`` (512 x 512 x 177) of
  ``<shared>/mmwhs_ct_labels`` with :func:`heartcascade.dataset.synthetic.make_case_from_labels`; the file
  predicted is the 1002 case.
* ``mr`` (full): the 25 MS-CMRSeg bSSFP pairs of ``<shared>/mscmrseg2019_bssfp`` imported by the real
  importer (label codes 200/500/600); the file predicted is the original ``image_1.nii.gz``.
* ``--quick``: two small parametric synthetic cases per modality (64-96 in-plane x 32-64 slices).

Every dataset is written under ``<work>/raw`` (the benchmark sets HC_RAW / HC_PREPROCESSED / HC_RESULTS
to ``<work>/...``), so the user's own data roots are never touched. A dataset already built with the
same recipe is reused (``bench_recipe.json`` in its folder).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from heartcascade.paths import find_dataset_name, raw_root
from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.errors import HCError

CT_LABEL_MAPS = ("ct_train_1002_label.nii.gz", "ct_train_1012_label.nii.gz")
MR_CODES = "200:Myo,500:LV,600:RV"
DATASET_IDS = {"ct": 961, "mr": 962}
RECIPE_VERSION = 1


@dataclass
class BenchCase:
    """One benchmark case: its dataset, the image file to predict and its reference label map."""

    name: str                 # "ct" or "mr"
    dataset_id: int
    dataset_dir: str
    predict_input: str        # an image file (single channel)
    reference_label: str      # training labels (0..C-1) on the same grid
    case_id: str              # the training case the input belongs to
    description: str
    size_xyz: list[int]
    spacing_xyz: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchCase":
        return cls(**d)


def _recipe_current(folder: Path, recipe: dict[str, Any]) -> bool:
    stamp = folder / "bench_recipe.json"
    if not (stamp.is_file() and (folder / "dataset.json").is_file()):
        return False
    try:
        return json.loads(stamp.read_text()) == recipe
    except (OSError, ValueError):
        return False


def _write_recipe(folder: Path, recipe: dict[str, Any]) -> None:
    atomic_write_json(folder / "bench_recipe.json", recipe)


def _geometry_of(path: Path) -> tuple[list[int], list[float]]:
    import SimpleITK as sitk  # deferred: SimpleITK, runner.py imports BenchCase and stays light for hc_benchmark --help

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return [int(v) for v in reader.GetSize()], [round(float(v), 6) for v in reader.GetSpacing()]


def _existing(dataset_id: int) -> Path | None:
    root = raw_root()
    name = find_dataset_name(dataset_id, root) if root.is_dir() else None
    return root / name if name else None


def build_ct(shared: Path | None, quick: bool, seed: int = 0) -> BenchCase:
    from heartcascade.dataset.dataset_json import MMWHS_CODES, MMWHS_LABELS  # deferred: SimpleITK, runner.py imports BenchCase and stays light for hc_benchmark --help
    from heartcascade.dataset.writer import DatasetWriter  # deferred: SimpleITK, runner.py imports BenchCase and stays light for hc_benchmark --help

    did = DATASET_IDS["ct"]
    if quick:
        recipe = {"version": RECIPE_VERSION, "kind": "ct-quick", "seed": seed}
        name, ids = "BenchQuickCT", ["ct_small_000", "ct_small_001"]
        description = "2 small parametric synthetic CT cases (heartcascade.dataset.synthetic.make_case)"
    else:
        folder = (shared / "mmwhs_ct_labels") if shared is not None else None
        if folder is None or not all((folder / f).is_file() for f in CT_LABEL_MAPS):
            raise HCError(f"{folder}: MM-WHS CT label maps {', '.join(CT_LABEL_MAPS)} not found "
                          f"(set --shared-data or HC_SHARED_DATA, or use --quick)")
        recipe = {"version": RECIPE_VERSION, "kind": "ct-full", "seed": seed,
                  "sources": [str((folder / f).resolve()) for f in CT_LABEL_MAPS]}
        name, ids = "BenchCT", ["ct_1002", "ct_1012"]
        description = ("full-size CT synthesised around MM-WHS label maps ct_train_1002 (512x512x239) and "
                       "ct_train_1012 (512x512x177) with make_case_from_labels")
    existing = _existing(did)
    if existing is None or not _recipe_current(existing, recipe):
        from heartcascade.dataset.synthetic import make_case, make_case_from_labels  # deferred: SimpleITK and scipy, runner.py imports BenchCase and stays light for hc_benchmark --help

        with DatasetWriter(did, name, overwrite=True) as out:
            for i, cid in enumerate(ids):
                if quick:
                    case = make_case(seed, i, "ct", "small")
                else:
                    case = make_case_from_labels(folder / CT_LABEL_MAPS[i], seed, i, "ct")
                out.write_case(cid, [case.image], case.label, case.geometry)
                del case
            existing = out.commit({"0": "CT"}, MMWHS_LABELS, None if quick else MMWHS_CODES,
                                  {"description": f"heartcascade benchmark: {description}"})
        _write_recipe(existing, recipe)
    image = existing / "imagesTr" / f"{ids[0]}_0000.nii.gz"
    size, spacing = _geometry_of(image)
    return BenchCase("ct", did, str(existing), str(image), str(existing / "labelsTr" / f"{ids[0]}.nii.gz"), ids[0],
                     description, size, spacing)


def build_mr(shared: Path | None, quick: bool, seed: int = 0) -> BenchCase:
    did = DATASET_IDS["mr"]
    existing = _existing(did)
    if quick:
        from heartcascade.dataset.dataset_json import MMWHS_LABELS  # deferred: SimpleITK, runner.py imports BenchCase and stays light for hc_benchmark --help
        from heartcascade.dataset.synthetic import make_case  # deferred: SimpleITK and scipy, runner.py imports BenchCase and stays light for hc_benchmark --help
        from heartcascade.dataset.writer import DatasetWriter  # deferred: SimpleITK, runner.py imports BenchCase and stays light for hc_benchmark --help

        recipe = {"version": RECIPE_VERSION, "kind": "mr-quick", "seed": seed}
        ids = ["mr_small_000", "mr_small_001"]
        description = "2 small parametric synthetic bSSFP-like MR cases"
        if existing is None or not _recipe_current(existing, recipe):
            with DatasetWriter(did, "BenchQuickMR", overwrite=True) as out:
                for i, cid in enumerate(ids):
                    case = make_case(seed, 100 + i, "mr", "small")
                    out.write_case(cid, [case.image], case.label, case.geometry)
                existing = out.commit({"0": "MR"}, MMWHS_LABELS, None, {"description": description})
            _write_recipe(existing, recipe)
        image = existing / "imagesTr" / f"{ids[0]}_0000.nii.gz"
        label = existing / "labelsTr" / f"{ids[0]}.nii.gz"
        case_id = ids[0]
    else:
        folder = (shared / "mscmrseg2019_bssfp") if shared is not None else None
        if folder is None or not (folder / "image_1.nii.gz").is_file():
            raise HCError(f"{folder}: MS-CMRSeg bSSFP files (image_1.nii.gz, ...) not found "
                          f"(set --shared-data or HC_SHARED_DATA, or use --quick)")
        recipe = {"version": RECIPE_VERSION, "kind": "mr-full", "source": str(folder.resolve())}
        description = "MS-CMRSeg 2019 bSSFP, 25 cases imported with hc_import (codes 200/500/600); predicted: image_1"
        if existing is None or not _recipe_current(existing, recipe):
            from heartcascade.dataset.importers import import_dataset  # deferred: SimpleITK, runner.py imports BenchCase and stays light for hc_benchmark --help

            existing = import_dataset(folder, did, "image_*.nii.gz", "label_*.nii.gz", MR_CODES, "mr", "BenchMR",
                                      overwrite=True)
            _write_recipe(existing, recipe)
        image = folder / "image_1.nii.gz"  # the original file, float64 voxels
        case_id = "BenchMR_001"
        label = existing / "labelsTr" / f"{case_id}.nii.gz"
    size, spacing = _geometry_of(image)
    return BenchCase("mr", did, str(existing), str(image), str(label), case_id, description, size, spacing)


def build_case(name: str, shared: Path | None, quick: bool, seed: int = 0) -> BenchCase:
    if name == "ct":
        return build_ct(shared, quick, seed)
    if name == "mr":
        return build_mr(shared, quick, seed)
    raise HCError(f"unknown benchmark case {name!r}; expected ct or mr")
