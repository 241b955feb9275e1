"""Check a raw dataset before planning and training, reporting every problem at once.

Why: a bad case (missing label, NaN image, label values the network cannot produce, a label whose
spacing differs from its image) otherwise fails hours later deep inside preprocessing or training.
Every problem is one line naming the file; nothing stops at the first problem.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from heartcascade.utils.progress import progress_bar

from heartcascade.dataset.dataset_json import DatasetInfo, load_dataset
from heartcascade.dataset import size_limits
from heartcascade.dataset.image_io import (Geometry, canonical_shape, choose_slice_axis, image_array, label_array,
                                          read_image)
from heartcascade.utils.errors import HCError

CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")


@dataclass
class VerifyReport:
    folder: Path
    problems: list[str] = field(default_factory=list)
    num_training: int = 0
    num_test: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        cases = f"{self.num_training} training + {self.num_test} test cases"
        if self.ok:
            return f"{self.folder}: OK ({cases})"
        return f"{self.folder}: {len(self.problems)} problem(s) in {cases}"


@dataclass
class _Case:
    case_id: str
    split: str                      # "Tr" or "Ts"
    channels: dict[int, Path] = field(default_factory=dict)
    label: Path | None = None


def _scan(info: DatasetInfo, split: str, report: VerifyReport) -> list[_Case]:
    """Pair channel files and labels of one split by name, reporting naming problems."""
    folder, ending = info.folder, info.file_ending
    images_dir, labels_dir = folder / f"images{split}", folder / f"labels{split}"
    cases: dict[str, _Case] = {}
    if images_dir.is_dir():
        for path in sorted(images_dir.iterdir()):
            if path.name.startswith("."):
                continue
            if not path.name.endswith(ending):
                report.problems.append(f"{path}: not a '{ending}' file (dataset.json file_ending)")
                continue
            match = CHANNEL_RE.match(path.name[: -len(ending)])
            if not match:
                report.problems.append(f"{path}: image name must end in _XXXX (4-digit channel index) before '{ending}'")
                continue
            case = cases.setdefault(match.group(1), _Case(match.group(1), split))
            case.channels[int(match.group(2))] = path
    elif split == "Tr":
        report.problems.append(f"{images_dir}: folder not found")
    labels: dict[str, Path] = {}
    if labels_dir.is_dir():
        for path in sorted(labels_dir.iterdir()):
            if path.name.startswith("."):
                continue
            if not path.name.endswith(ending):
                report.problems.append(f"{path}: not a '{ending}' file (dataset.json file_ending)")
                continue
            labels[path.name[: -len(ending)]] = path
    elif split == "Tr" and cases:
        report.problems.append(f"{labels_dir}: folder not found")
    n = info.num_channels
    for case in cases.values():
        for c in range(n):
            if c not in case.channels:
                report.problems.append(f"{images_dir / f'{case.case_id}_{c:04d}{ending}'}: missing channel file "
                                       f"(dataset.json declares {n} channel(s))")
        for c in sorted(case.channels):
            if c >= n:
                report.problems.append(f"{case.channels[c]}: channel {c} but dataset.json channel_names declares "
                                       f"{n} channel(s)")
        case.label = labels.get(case.case_id)
        if case.label is None and split == "Tr":
            report.problems.append(f"{labels_dir / (case.case_id + ending)}: missing label for training case {case.case_id}")
    for case_id, path in labels.items():
        if case_id not in cases:
            report.problems.append(f"{path}: label without images (no {images_dir.name}/{case_id}_0000{ending})")
    return sorted(cases.values(), key=lambda c: c.case_id)


def _check_case(case: _Case, info: DatasetInfo, allowed: set[int], report: VerifyReport) -> None:
    ref: tuple[Path, Geometry] | None = None
    files = [case.channels[c] for c in sorted(case.channels) if c < info.num_channels]
    for path in files:
        try:
            image = read_image(path)
            image_array(image, path)
        except HCError as exc:
            report.problems.append(str(exc))
            continue
        geometry = Geometry.of(image)
        if ref is None:
            ref = (path, geometry)
            slice_axis = choose_slice_axis(geometry.spacing, geometry.direction)
            small = size_limits.too_small(canonical_shape(geometry.size, slice_axis))
            if small:
                report.problems.append(f"{path}: {small}")
        else:
            _compare(path, geometry, ref, report)
    if case.label is None:
        return
    try:
        image = read_image(case.label)
        values = np.unique(label_array(image, case.label))
    except HCError as exc:
        report.problems.append(str(exc))
        return
    bad = sorted(int(v) for v in values if int(v) not in allowed)
    if bad:
        report.problems.append(f"{case.label}: label values {', '.join(map(str, bad[:10]))} not declared in "
                               f"dataset.json labels ({', '.join(map(str, sorted(allowed)))})")
    if ref is not None:
        _compare(case.label, Geometry.of(image), ref, report)


def _compare(path: Path, geometry: Geometry, ref: tuple[Path, Geometry], report: VerifyReport) -> None:
    problem = ref[1].mismatch(geometry)
    if problem:
        report.problems.append(f"{path}: geometry differs from {ref[0].name}: {problem}")


def verify_dataset(folder: str | Path, progress: bool = True) -> VerifyReport:
    """Check every case of a raw dataset folder; never raises for problems in the data."""
    folder = Path(folder)
    report = VerifyReport(folder)
    try:
        info = load_dataset(folder)
    except HCError as exc:
        report.problems.append(str(exc))
        return report
    keys = sorted(info.channel_names)
    if keys != [str(i) for i in range(len(keys))]:
        report.problems.append(f"{folder / 'dataset.json'}: channel_names keys must be \"0\", \"1\", ..., got {keys}")
    train = _scan(info, "Tr", report)
    test = _scan(info, "Ts", report)
    report.num_training, report.num_test = len(train), len(test)
    if info.num_training != len(train):
        report.problems.append(f"{folder / 'dataset.json'}: numTraining is {info.num_training} but imagesTr holds "
                               f"{len(train)} case(s)")
    allowed = set(info.labels.values())
    for case in progress_bar(train + test, enabled=progress, desc="verifying", unit="case"):
        _check_case(case, info, allowed, report)
    return report
