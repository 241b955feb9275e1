"""The raw dataset layout (nnU-Net v2 compatible) and its ``dataset.json``.

::

    DatasetXXX_Name/
        dataset.json
        imagesTr/CASE_0000.nii.gz   (one file per channel: _0000, _0001, ...)
        labelsTr/CASE.nii.gz
        imagesTs/CASE_0000.nii.gz   (optional)
        labelsTs/CASE.nii.gz        (optional, used for evaluation only)

``dataset.json`` keys: ``channel_names`` ({"0": "CT"}), ``labels`` ({"background": 0, "LV": 1, ...}),
``numTraining``, ``file_ending``; heartcascade adds the optional ``label_codes`` ({"1": 500, ...}: training
label → the dataset's original code) so predictions can be written back in the original codes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from heartcascade.dataset.image_io import IMAGE_ENDINGS
from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json

MMWHS_LABELS = {"background": 0, "LV": 1, "Myo": 2, "RV": 3, "LA": 4, "RA": 5, "AA": 6, "PA": 7}
MMWHS_CODES = {1: 500, 2: 205, 3: 600, 4: 420, 5: 550, 6: 820, 7: 850}
CT_NAMES = {"ct", "computed tomography"}


@dataclass
class Case:
    case_id: str
    images: list[Path]
    label: Path | None = None


@dataclass
class DatasetInfo:
    folder: Path
    channel_names: dict[str, str]
    labels: dict[str, int]
    num_training: int
    file_ending: str
    label_codes: dict[int, int] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of output classes including background."""
        return max(self.labels.values()) + 1

    @property
    def modality(self) -> str:
        """'ct' when the first channel is CT, else 'mr' (the normalisation scheme follows)."""
        return "ct" if self.channel_names["0"].strip().lower() in CT_NAMES else "mr"

    def label_name(self, value: int) -> str:
        return {v: k for k, v in self.labels.items()}.get(value, str(value))

    def training_cases(self) -> list[Case]:
        return self._cases("imagesTr", "labelsTr", require_labels=True)

    def test_cases(self) -> list[Case]:
        return self._cases("imagesTs", "labelsTs", require_labels=False)

    def _cases(self, image_dir: str, label_dir: str, require_labels: bool) -> list[Case]:
        images = self.folder / image_dir
        if not images.is_dir():
            if require_labels:
                raise HCError(f"{images}: folder not found")
            return []
        ending = self.file_ending
        ids = sorted({p.name[: -len(ending) - 5] for p in images.iterdir()
                      if p.name.endswith(ending) and p.name[: -len(ending)][-5:-4] == "_" and not p.name.startswith(".")})
        cases = []
        for case_id in ids:
            files = [images / f"{case_id}_{c:04d}{ending}" for c in range(self.num_channels)]
            label = self.folder / label_dir / f"{case_id}{ending}"
            cases.append(Case(case_id, files, label if label.is_file() else None))
        return cases

    def unpaired_training_files(self) -> list[str]:
        """Problems that would make a training case vanish silently: an image named without its 4-digit
        channel index (``CASE.nii.gz`` instead of ``CASE_0000.nii.gz``) or a label without images."""
        images, labels, ending = self.folder / "imagesTr", self.folder / "labelsTr", self.file_ending
        problems = []
        ids = set()
        if images.is_dir():
            for p in sorted(images.iterdir()):
                if p.name.startswith(".") or not p.name.lower().endswith(IMAGE_ENDINGS):
                    continue
                stem = p.name[: -len(ending)] if p.name.endswith(ending) else None
                if stem is None:
                    problems.append(f"{p}: training image does not end in '{ending}' (dataset.json file_ending)")
                elif len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
                    problems.append(f"{p}: training image name lacks the channel index; name it "
                                    f"{stem}_0000{ending}")
                else:
                    ids.add(stem[:-5])
        if labels.is_dir():
            for p in sorted(labels.iterdir()):
                if p.name.startswith(".") or not p.name.endswith(ending):
                    continue
                if p.name[: -len(ending)] not in ids:
                    problems.append(f"{p}: label without training image (no imagesTr/"
                                    f"{p.name[: -len(ending)]}_0000{ending})")
        return problems

    def to_json(self) -> dict:
        data = {"channel_names": self.channel_names, "labels": self.labels, "numTraining": self.num_training,
                "file_ending": self.file_ending}
        if self.label_codes:
            data["label_codes"] = {str(k): int(v) for k, v in self.label_codes.items()}
        data.update(self.extra)
        return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_dataset(folder: str | Path) -> DatasetInfo:
    """Read and type-check ``dataset.json`` (every problem is a one-line HCError naming the field)."""
    folder = Path(folder)
    path = folder / "dataset.json"
    data = load_json(path)
    if not isinstance(data, dict):
        raise HCError(f"{path}: must be a JSON object with channel_names, labels and file_ending")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in data:
            raise HCError(f"{path}: missing key '{key}'")
    channels = data["channel_names"]
    if not isinstance(channels, dict) or not channels or \
            sorted(channels, key=str) != sorted((str(i) for i in range(len(channels))), key=str) or \
            not all(isinstance(v, str) and v.strip() for v in channels.values()):
        raise HCError(f"{path}: 'channel_names' must map \"0\", \"1\", ... to non-empty names, e.g. "
                      f"{{\"0\": \"CT\"}}, got {str(channels)[:80]}")
    labels = data["labels"]
    if not isinstance(labels, dict) or not labels:
        raise HCError(f"{path}: 'labels' must be an object of name: value, e.g. {{\"background\": 0, \"LV\": 1}}")
    if not all(_is_int(v) for v in labels.values()):
        raise HCError(f"{path}: 'labels' values must be integers (region-based labels are not supported)")
    values = sorted(labels.values())
    if values[0] != 0 or values != list(range(len(values))):
        raise HCError(f"{path}: 'labels' must be consecutive integers starting at 0 for background, got {values}")
    ending = data["file_ending"]
    if not isinstance(ending, str) or not ending.startswith(".") or "/" in ending or len(ending) > 16:
        raise HCError(f"{path}: 'file_ending' must be a file ending such as \".nii.gz\", got {ending!r}")
    num_training = data.get("numTraining", 0)
    if not _is_int(num_training) or num_training < 0:
        raise HCError(f"{path}: 'numTraining' must be a non-negative integer, got {num_training!r}")
    codes = data.get("label_codes")
    if codes is not None and (not isinstance(codes, dict) or not all(
            str(k).isdigit() and _is_int(v) for k, v in codes.items())):
        raise HCError(f"{path}: 'label_codes' must map training labels to integer codes, e.g. {{\"1\": 500}}")
    label_codes = {int(k): int(v) for k, v in codes.items()} if codes else None
    if label_codes and set(label_codes) - set(values):
        raise HCError(f"{path}: 'label_codes' names labels not in 'labels': {sorted(set(label_codes) - set(values))}")
    known = {"channel_names", "labels", "numTraining", "file_ending", "label_codes"}
    return DatasetInfo(folder=folder, channel_names={str(k): str(v) for k, v in channels.items()},
                       labels=dict(labels), num_training=int(num_training), file_ending=ending,
                       label_codes=label_codes, extra={k: v for k, v in data.items() if k not in known})


def write_dataset_json(info: DatasetInfo) -> None:
    atomic_write_json(info.folder / "dataset.json", info.to_json())
