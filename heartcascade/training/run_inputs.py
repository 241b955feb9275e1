"""What a training run starts from: the preprocessed dataset, its labelled cases, the plans with the
run's overrides, and the checks that a resumed run still matches its data."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

from heartcascade.paths import find_dataset_name, parse_dataset_id, preprocessed_root, raw_root
from heartcascade.planning.plans import (Plans, check_override_keys, load_plans, preprocessing_fields,
                                         preprocessing_hash, with_settings)
from heartcascade.preprocessing.storage import list_cases
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import parse_json


def find_preprocessed(dataset: int | str) -> Path:
    """The preprocessed dataset folder, or an HCError naming the command that makes it."""
    did = parse_dataset_id(dataset)
    root = preprocessed_root()
    name = find_dataset_name(did, root) if root.is_dir() else None
    if name is None:
        raw_name = find_dataset_name(did, raw_root()) if raw_root().is_dir() else None
        what = raw_name or f"Dataset{did:03d}_*"
        raise HCError(f"no preprocessed data for dataset {did} ({what}) in {root}; "
                      f"run: hc_plan_and_preprocess -d {did}")
    folder = root / name
    if not (folder / "plans.json").is_file():
        raise HCError(f"{folder / 'plans.json'} not found (preprocessing incomplete); run: hc_plan_and_preprocess -d {did}")
    return folder


def labelled_cases(pre_dir: Path, data_dir: Path) -> list[str]:
    """The preprocessed cases that have labels (HCError when there are none)."""
    all_cases = list_cases(data_dir)
    if not all_cases:
        raise HCError(f"{data_dir}: no preprocessed cases; run: hc_plan_and_preprocess -d "
                      f"{pre_dir.name[7:10].lstrip('0') or '0'}")
    labelled = [c for c in all_cases if (data_dir / f"{c}_seg.npy").is_file()]
    if len(labelled) < 1:
        raise HCError(f"{data_dir}: no preprocessed case has labels")
    return labelled


def parse_override(text: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A plans override given as a JSON object, a path to a JSON file, or already a dict."""
    if text is None:
        return None
    if isinstance(text, Mapping):
        return normalise_override(dict(text), "plans override")
    candidate = Path(text)
    source = "--plans-override"
    if not text.lstrip().startswith("{") and candidate.is_file():
        source = str(candidate)
        text = candidate.read_text(encoding="utf-8")
    value = parse_json(text, source)
    if not isinstance(value, dict):
        raise HCError(f"{source}: must be a JSON object, e.g. '{{\"training\": {{...}}}}'")
    return normalise_override(value, source)


def normalise_override(value: dict[str, Any], source: str = "--plans-override") -> dict[str, Any]:
    """Accept ``training.steps`` as ``{"2": {...}}`` as well as the plans' list ``[{"step": 2, ...}]``; every key
    must be a plans field (an unknown one is a one-line HCError naming it)."""
    steps = (value.get("training") or {}).get("steps") if isinstance(value.get("training"), Mapping) else None
    if isinstance(steps, Mapping):
        value = copy.deepcopy(value)
        try:
            value["training"]["steps"] = [{**dict(v), "step": int(k)} for k, v in steps.items()]
        except (TypeError, ValueError):
            raise HCError("plans override: training.steps keys must be step numbers 1..4") from None
    check_override_keys(value, source)
    return value


def run_plans(pre_dir: Path, override: Mapping[str, Any] | None) -> Plans:
    """The dataset's plans with ``--plans-override`` merged (never a field the preprocessed data depend on;
    the result is the fold folder's plans.json and the checkpoints' plans)."""
    plans = load_plans(pre_dir / "plans.json")
    if override:
        merged = with_settings(plans, override)
        before, after = preprocessing_fields(plans), preprocessing_fields(merged)
        changed = sorted(k for k in before if before[k] != after[k])
        if changed:
            raise HCError(f"--plans-override changes field(s) the preprocessed data depend on "
                          f"({', '.join(changed)}); put them in a preset and re-run hc_plan_and_preprocess")
        plans = merged
    return plans


def data_plans_hash(pre_dir: Path) -> str:
    """Identity of the plans the preprocessed data were made with (the hash of the plans fields
    preprocessing depends on, as in each case's stamp): recorded in the checkpoints as
    ``data_plans_hash``, so a run never continues on data re-preprocessed with other plans."""
    return preprocessing_hash(load_plans(pre_dir / "plans.json"))


def check_data_unchanged(recorded: str | None, pre_dir: Path, where: Path | str) -> None:
    """HCError when ``pre_dir`` was re-planned since ``recorded`` (None: a checkpoint from before the field)."""
    if recorded is None:
        return
    current = data_plans_hash(pre_dir)
    if current != recorded:
        raise HCError(f"{where}: this run trains on data preprocessed with other plans (hash {recorded}); "
                      f"{pre_dir} was re-planned since (hash {current}); start the fold over without --continue")


def check_resume(resume: Mapping[str, Any], latest: Path, configuration: str, labelled: Sequence[str],
                 data_dir: Path, requested_steps: Sequence[str] | None, plans_hash: str | None = None) -> None:
    """A ``--continue`` checkpoint must be of this configuration, its cases still there, its steps the same,
    its data preprocessed with the same plans."""
    if "step_index" not in resume:  # written before the checkpoints said "step" (they said "stage")
        raise HCError(f"{latest}: checkpoint of an older heartcascade; start over without --continue")
    if resume.get("configuration") != configuration:
        raise HCError(f"{latest}: is a '{resume.get('configuration')}' checkpoint, not '{configuration}'")
    recorded = resume.get("data_plans_hash")
    if plans_hash is not None and recorded is not None and recorded != plans_hash:
        raise HCError(f"{latest}: the interrupted run trained on data preprocessed with other plans (hash "
                      f"{recorded}, now {plans_hash}); hc_plan_and_preprocess re-planned {data_dir.parent} since; "
                      "start the fold over without --continue")
    missing = sorted(set(resume.get("train_cases", [])) - set(labelled))
    if missing:
        raise HCError(f"{latest}: training case(s) {', '.join(missing[:5])} of the interrupted run are no "
                      f"longer in {data_dir}")
    steps = list(resume["steps"])
    if requested_steps is not None and list(requested_steps) != steps:
        raise HCError(f"{latest}: the interrupted run trains steps {','.join(steps)}; "
                      f"continue it with the same --steps (or without --continue to start over)")
