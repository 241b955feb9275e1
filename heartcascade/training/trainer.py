"""The trainer: the paper's four-step curriculum for the cascade, and the 2 mm baseline U-Net.

Programmatic use (what ``hc_train`` and ``hc_demo`` call)::

    from heartcascade.training.trainer import Trainer
    result = Trainer(dataset=1, fold=0, configuration="cascade").run()
    result.output_folder, result.final_checkpoint, result.validation_summary

Curriculum (paper Table 1; iterations, batch size, lr, losses and patch sizes per step from the plans'
``training.steps``):

====  ===========================================  ==================  ==============
step  batches                                       loss                trains
====  ===========================================  ==================  ==============
1     whole coarse volumes (batch 1)                L1_ROI              Net1
2     full-res subvolumes, downsampled for Net1     L1 + L1_ROI         Net1
3     full-res subvolumes through the cascade       L1 + L2             Net1 + Net2
4     K full slices + frozen Net1's probabilities   L2                  Net2
====  ===========================================  ==================  ==============

L1* are computed on Net1's coarse logits against the labels downsampled to Net1's grid (nearest),
L2* on Net2's centre-slice logits. Step 4 precomputes frozen Net1's softmax on each training case's
whole coarse volume once at the start of the step (exactly what Net2 sees at inference: Net1 on the
whole volume, upsampled); the loader upsamples it to the K slices of each sample.

Each step gets a fresh Adam optimiser (its own lr). Checkpoints (``checkpoint_latest.pth`` every
``training.checkpoint_every`` iterations and at the end of every step, ``checkpoint_best.pth`` when the
moving average of the validation Dice improves, ``checkpoint_final.pth`` at the end) are written
atomically and hold the complete resume state, so ``continue_training=True`` continues bit-for-bit
where the last checkpoint was taken (same batches, same dropout masks, same optimiser state).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from heartcascade.inference.predictor import Predictor
from heartcascade.losses.terms import total_loss
from heartcascade.networks import from_plans
from heartcascade.networks.blocks import init_classifier_bias
from heartcascade.paths import find_dataset_name, parse_dataset_id, preprocessed_root, raw_root, results_root
from heartcascade.planning.plans import load_plans, preprocessing_fields, validate_plans
from heartcascade.preprocessing.storage import data_dir, list_cases
from heartcascade.training import distributed as dist_utils
from heartcascade.training.cases import baseline_grid_case, load_train_case
from heartcascade.training.checkpoint import (FORMAT_VERSION, capture_rng_state, checkpoint_path, load_checkpoint,
                                              optimizer_state_cpu, plain, restore_rng_state, save_checkpoint,
                                              state_dict_cpu)
from heartcascade.training.config import (BASELINE_STAGE, CASCADE_STEPS, StepConfig, TrainingConfig,
                                          checkpoint_interval, deep_merge, parse_override, training_config)
from heartcascade.training.dataloading import BatchStream, default_num_workers
from heartcascade.training.final_validation import raw_dataset_dir, run_final_validation
from heartcascade.training.logger import TrainingLogger
from heartcascade.training.steps import StepRunner, autocast, step_runner
from heartcascade.training.time_budget import StepSchedule, parse_duration, step_allotment
from heartcascade.training.splits import fold_cases, fold_folder_name, load_or_create_splits, parse_fold
from heartcascade.training.validation import validation_dice, validation_predictor
from heartcascade.utils.atomic import atomic_write_bytes, atomic_write_json
from heartcascade.utils.device import resolve_device
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json
from heartcascade.utils.progress import progress_bar

_STAGE_CODES = {"1": 1, "2": 2, "3": 3, "4": 4, BASELINE_STAGE: 9}

Callback = Callable[[str, dict[str, Any]], None]


class StopTraining(Exception):
    """Raise from a callback to stop a run (as if killed) -- used by tests."""


@dataclass
class TrainingResult:
    output_folder: Path
    configuration: str
    fold: str
    stages: list[str]
    final_checkpoint: Path
    epoch_losses: dict[str, list[float]] = field(default_factory=dict)
    last_validation: dict[str, Any] | None = None
    seconds_per_iteration: dict[str, float] = field(default_factory=dict)
    validation_summary: dict[str, Any] | None = None
    validation_method: str | None = None


@dataclass
class StepTraining:
    """What :meth:`Trainer.train_step` runs a step with (from :meth:`Trainer.build_optimizer`)."""

    step: str
    runner: StepRunner
    module: nn.Module  # the runner's module, wrapped for DDP when distributed
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: Any


def step_learning_rate(base: float, iteration: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate of a step's ``iteration`` (0-based): linear warm-up, then constant or poly decay."""
    if warmup > 0 and iteration < warmup:
        return base * (iteration + 1) / warmup
    if schedule == "poly":
        progress = (iteration - warmup) / max(1, total - warmup)
        return base * max(0.0, 1.0 - progress) ** 0.9
    return base


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


class Trainer:
    """Train one fold of one configuration. See the module docstring and documentation/training.md.

    Args:
        dataset: dataset id (``1``, ``"001"``, ``"Dataset001_Name"``).
        fold: ``0``..``4`` / ``"fold0"`` / ``"all"`` (validity checked against the splits file).
        configuration: ``"cascade"`` or ``"baseline"``.
        steps: curriculum steps to run (subset of 1..4, e.g. ``[2, 3, 4]`` for an ablation); default all.
        continue_training: resume from ``checkpoint_latest.pth`` of the fold folder when present.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        compile: wrap the trained modules in ``torch.compile``.
        num_workers: data-augmentation worker processes (0 = in-process); default env ``HC_N_PROC_DA``,
            then the plans.
        plans_override: dict / JSON text / JSON file deep-merged into the plans (recorded in the copy of
            plans.json written to the fold folder and in the checkpoints).
        splits_file: a custom splits file instead of ``splits_final.json``.
        seed: seeds the data stream and the network initialisation (default: the plans' training.seed).
        predict_validation: at the end, predict the fold's validation cases and evaluate them.
        progress: show tqdm bars.
        callback: ``callback(event, info)`` called after every iteration (``event == "iteration"``) and at
            checkpoints; raising :class:`StopTraining` stops the run like a kill (tests).
        output_folder: override of ``HC_RESULTS/DatasetXXX_Name/<configuration>/fold_<f>``.
        time_budget: wall-clock budget of the curriculum (``"60m"``, ``"1.5h"``, seconds); overrides the
            plans' ``training.time_budget_s``. The steps share it by their ``time_fraction``; each step's
            iteration count is set from its measured speed (see :mod:`heartcascade.training.time_budget`).
    """

    def __init__(self, dataset: int | str, fold: int | str, configuration: str = "cascade",
                 steps: Sequence[int | str] | None = None, continue_training: bool = False, device: str = "auto",
                 compile: bool = False, num_workers: int | None = None,
                 plans_override: str | dict[str, Any] | None = None, splits_file: str | Path | None = None,
                 seed: int | None = None, predict_validation: bool = True, progress: bool = True,
                 callback: Callback | None = None, output_folder: str | Path | None = None,
                 time_budget: str | float | None = None) -> None:
        if configuration not in ("cascade", "baseline"):
            raise HCError(f"unknown configuration {configuration!r}; expected cascade or baseline")
        self.dataset = dataset
        self.fold_arg = fold
        self.configuration = configuration
        self.requested_steps = None if steps is None else [str(s).strip() for s in steps]
        if self.requested_steps is not None:
            if configuration == "baseline":
                raise HCError("--steps applies to the cascade; the baseline has a single stage")
            bad = [s for s in self.requested_steps if s not in CASCADE_STEPS]
            if bad or not self.requested_steps:
                raise HCError(f"--steps must list curriculum steps among 1,2,3,4 (e.g. 2,3,4), got {','.join(bad) or 'nothing'}")
            self.requested_steps = sorted(set(self.requested_steps), key=int)
        self.continue_training = continue_training
        self.device = resolve_device(device)
        self.compile = compile
        self.num_workers_arg = num_workers
        self.plans_override = parse_override(plans_override)
        self.splits_file = splits_file
        self.seed_arg = None if seed is None else int(seed)
        self.predict_validation = predict_validation
        self.progress = progress
        self.callback = callback
        self.output_folder_arg = Path(output_folder) if output_folder is not None else None
        self.time_budget_s = None if time_budget is None else parse_duration(time_budget)
        self.dist = dist_utils.DistInfo()

    # ------------------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        """Read the plans, splits and cases and build the networks: all a step needs (the benchmark calls
        this, then :meth:`build_loader`, :meth:`build_optimizer` and :meth:`train_step`)."""
        self._resume = self._read_run()
        self._load_cases()
        self._build_networks()
        self._runners: dict[str, StepRunner] = {}
        self._active: StepTraining | None = None

    def _read_run(self) -> dict[str, Any] | None:
        self.dist = dist_utils.init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.pre_dir = find_preprocessed(self.dataset)
        self.data_dir = data_dir(self.pre_dir)
        all_cases = list_cases(self.data_dir)
        if not all_cases:
            raise HCError(f"{self.data_dir}: no preprocessed cases; run: hc_plan_and_preprocess -d "
                          f"{self.pre_dir.name[7:10].lstrip('0') or '0'}")
        labelled = [c for c in all_cases if (self.data_dir / f"{c}_seg.npy").is_file()]
        if len(labelled) < 1:
            raise HCError(f"{self.data_dir}: no preprocessed case has labels")
        self.case_ids = labelled
        splits, self.splits_path = load_or_create_splits(self.pre_dir, labelled, self.splits_file,
                                                         write=self.dist.is_main)
        self.fold = parse_fold(self.fold_arg, len(splits))
        self.train_ids, self.val_ids = fold_cases(splits, self.fold, labelled)
        if not self.train_ids:
            raise HCError(f"fold {self.fold}: no training cases")
        if self.output_folder_arg is not None:
            self.output_folder = self.output_folder_arg
        else:
            self.output_folder = results_root() / self.pre_dir.name / self.configuration / fold_folder_name(self.fold)

        resume = None
        latest = checkpoint_path(self.output_folder, "latest")
        if self.continue_training and latest.is_file():
            resume = load_checkpoint(latest)
            if resume.get("configuration") != self.configuration:
                raise HCError(f"{latest}: is a '{resume.get('configuration')}' checkpoint, not '{self.configuration}'")
            self.plans = resume["plans"]
            self.seed = int(resume.get("seed", 0))
            self.stages = list(resume["steps"])
            missing = sorted(set(resume.get("train_cases", [])) - set(labelled))
            if missing:
                raise HCError(f"{latest}: training case(s) {', '.join(missing[:5])} of the interrupted run are no "
                              f"longer in {self.data_dir}")
            self.train_ids = list(resume.get("train_cases", self.train_ids))
            self.val_ids = [c for c in resume.get("val_cases", self.val_ids) if c in labelled]
            if self.requested_steps is not None and self.configuration == "cascade" \
                    and self.requested_steps != self.stages:
                raise HCError(f"{latest}: the interrupted run trains steps {','.join(self.stages)}; "
                              f"continue it with the same --steps (or without --continue to start over)")
        else:
            plans = load_plans(self.pre_dir / "plans.json")
            if self.plans_override:
                merged = validate_plans(deep_merge(plans, self.plans_override), "plans with --plans-override")
                before, after = preprocessing_fields(plans), preprocessing_fields(merged)
                changed = sorted(k for k in before if before[k] != after[k])
                if changed:
                    raise HCError(f"--plans-override changes field(s) the preprocessed data depend on "
                                  f"({', '.join(changed)}); put them in a preset and re-run hc_plan_and_preprocess")
                plans = merged
            if self.time_budget_s is not None:  # recorded in the plans copy of the fold folder
                plans = deep_merge(plans, {"training": {"time_budget_s": self.time_budget_s}})
            self.plans = plans
            if self.configuration == "cascade":
                self.stages = self.requested_steps or list(CASCADE_STEPS)
            else:
                self.stages = [BASELINE_STAGE]
        self.cfg: TrainingConfig = training_config(self.plans, self.configuration)
        if resume is None:
            self.seed = self.cfg.seed if self.seed_arg is None else self.seed_arg
        self.stages = [s for s in self.stages if self.cfg.steps[s].iterations > 0]
        if not self.stages:
            raise HCError("nothing to train: every selected step has 0 epochs or is disabled in the plans")
        self.num_workers = self.num_workers_arg if self.num_workers_arg is not None \
            else default_num_workers(self.cfg.num_workers)
        self.dataset_json_path = self.pre_dir / "dataset.json"
        self.logger = TrainingLogger(self.output_folder, enabled=self.dist.is_main, echo=self.progress,
                                     class_names=self.cfg.class_names)
        return resume

    def _load_cases(self) -> None:
        self.train_cases = [load_train_case(self.data_dir, c) for c in self.train_ids]
        val_ids = self.val_ids
        if self.cfg.val_max_cases is not None:
            val_ids = val_ids[: int(self.cfg.val_max_cases)]
        self.val_cases = [load_train_case(self.data_dir, c) for c in val_ids]  # preprocessed grid (memory-mapped)
        if self.configuration == "baseline":
            spacing = self.cfg.baseline_spacing
            assert spacing is not None  # training_config checks it for the baseline
            self.train_cases = [baseline_grid_case(c, spacing, self.cfg.num_classes) for c in self.train_cases]

    def _build_networks(self) -> None:
        torch.manual_seed(self.seed)
        if self.configuration == "cascade":
            self.cascade = from_plans.build_cascade(self.plans).to(self.device)
            self.networks = {"net1": self.cascade.net1, "net2": self.cascade.net2}
            self._runner_networks: dict[str, nn.Module] = {"cascade": self.cascade}
        else:
            self.baseline = from_plans.build_baseline(self.plans).to(self.device)
            self.networks = {"baseline": self.baseline}
            self._runner_networks = {"baseline": self.baseline}
        if self.cfg.classifier_bias_init == "class_prior" and self.cfg.class_fractions:
            for net in self.networks.values():
                init_classifier_bias(net.classifier, self.cfg.class_fractions)
        if self.compile:
            # In place (state_dict keys unchanged), static shapes: one graph per patch shape.
            for net in self.networks.values():
                net.compile(dynamic=False)

    # ------------------------------------------------------------------------------------------------
    # checkpoints

    def _state(self, kind: str, stage_index: int, iteration: int, optimizer: torch.optim.Optimizer | None,
               scaler: Any, rng_states: list[Any] | None, finished: bool = False) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "configuration": self.configuration,
            "plans": plain(self.plans),
            "networks": {k: state_dict_cpu(v) for k, v in self.networks.items()},
            "kind": kind,
            "steps": list(self.stages),
            "stage_index": int(stage_index),
            "stage": self.stages[stage_index] if stage_index < len(self.stages) else None,
            "iteration": int(iteration),
            "finished": bool(finished),
            "optimizer": optimizer_state_cpu(optimizer) if optimizer is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states,
            "logger": self.logger.state(),
            "best": dict(self.best),
            "step_best": self.step_best if kind == "latest" else None,
            "best_by_target": dict(self.best_by_target),
            "budget": {"elapsed_s": self._elapsed(),
                       "step": self.schedule.state() if self.schedule is not None and not finished else None,
                       "iterations": {k: v.iterations_override for k, v in self.cfg.steps.items()}},
            "epoch_acc": plain(self.epoch_acc),
            "fold": str(self.fold),
            "seed": self.seed,
            "world_size": self.dist.world_size,
            "train_cases": list(self.train_ids),
            "val_cases": list(self.val_ids),
            "torch_version": str(torch.__version__),
        }

    def _save(self, kind: str, stage_index: int, iteration: int, optimizer: torch.optim.Optimizer | None,
              scaler: Any, finished: bool = False) -> None:
        rng_states = dist_utils.all_gather_object(capture_rng_state()) if kind == "latest" else None
        if self.dist.is_main:
            self.logger.flush(plot=not kind.startswith("step"))
            state = self._state(kind, stage_index, iteration, optimizer, scaler, rng_states, finished)
            save_checkpoint(checkpoint_path(self.output_folder, kind), state)
        dist_utils.barrier()
        if self.callback is not None:
            self.callback("checkpoint", {"kind": kind, "stage_index": stage_index, "iteration": iteration})

    # ------------------------------------------------------------------------------------------------
    # main entry

    def run(self) -> TrainingResult:
        try:
            return self._run()
        finally:
            dist_utils.cleanup()

    def _run(self) -> TrainingResult:
        started = time.monotonic()
        self.setup()
        resume = self._resume
        if self.dist.is_main:
            self.output_folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.output_folder / "plans.json", self.plans)
            if self.dataset_json_path.is_file():
                atomic_write_bytes(self.output_folder / "dataset.json", self.dataset_json_path.read_bytes())
        self.best: dict[str, Any] = {"target": None, "ema": None, "best_ema": None, "stage": None, "iteration": None}
        self.epoch_acc: dict[str, Any] = {}
        self.epoch_losses: dict[str, list[float]] = {}
        self.seconds: dict[str, list[float]] = {}
        self.last_validation: dict[str, Any] | None = None
        self.step_best: dict[str, Any] | None = None  # best-validated weights of the running step
        self.best_by_target: dict[str, float] = {}  # score of the weights each step handed on, by target
        self.run_started = started  # the time budget counts from here (resume: minus the time spent)
        self.validation_seconds = 0.0  # the last in-training validation's duration (final-validation reserve)
        self.schedule: StepSchedule | None = None
        budget_state: dict[str, Any] | None = None
        stage_index, start_iteration = 0, 0
        resume_optimizer = resume_scaler = None
        rng_to_restore = None
        if resume is not None:
            for key, net in self.networks.items():
                net.load_state_dict(resume["networks"][key])
            self.logger.load_state(resume.get("logger", {}))
            self.best = dict(resume.get("best") or self.best)
            self.epoch_acc = dict(resume.get("epoch_acc") or {})
            self.step_best = resume.get("step_best")
            self.best_by_target = dict(resume.get("best_by_target") or {})
            budget = resume.get("budget") or {}
            self.run_started -= float(budget.get("elapsed_s") or 0.0)
            budget_state = budget.get("step")
            for key, value in (budget.get("iterations") or {}).items():
                if key in self.cfg.steps:
                    self.cfg.steps[key].iterations_override = value
            stage_index, start_iteration = int(resume["stage_index"]), int(resume["iteration"])
            resume_optimizer, resume_scaler = resume.get("optimizer"), resume.get("scaler")
            states = resume.get("rng") or []
            if states:
                rng_to_restore = states[self.dist.rank] if self.dist.rank < len(states) else states[0]
            self.logger.log(f"resuming from {checkpoint_path(self.output_folder, 'latest')}: "
                            f"step {resume.get('stage')} iteration {start_iteration}"
                            + (" (all steps done)" if stage_index >= len(self.stages) else ""))
        else:
            self._log_header()
            if self.continue_training:
                self.logger.log(f"--continue: no {checkpoint_path(self.output_folder, 'latest').name} in "
                                f"{self.output_folder}, starting from scratch")
            elif checkpoint_path(self.output_folder, "latest").is_file():
                self.logger.log(f"note: replacing the earlier run in {self.output_folder} (use --continue to resume it)")
        for record in self.logger.records:
            if record.get("type") == "train":
                self.epoch_losses.setdefault(str(record["stage"]), []).append(record["loss"])

        for index in range(stage_index, len(self.stages)):
            first = index == stage_index
            self._run_stage(index, start_iteration if first else 0,
                            resume_optimizer if first else None, resume_scaler if first else None,
                            rng_to_restore if first else None, budget_state if first else None)
        if resume is None or stage_index < len(self.stages) or not checkpoint_path(self.output_folder, "final").is_file():
            self._save("final", len(self.stages), 0, None, None, finished=True)
            self._save("latest", len(self.stages), 0, None, None, finished=True)
        result = TrainingResult(self.output_folder, self.configuration, str(self.fold), list(self.stages),
                                checkpoint_path(self.output_folder, "final"), self.epoch_losses,
                                self.last_validation,
                                {k: float(np.mean(v)) for k, v in self.seconds.items() if v})
        if self.predict_validation and self.dist.is_main:
            summary, method = self._final_validation()
            result.validation_summary, result.validation_method = summary, method
        dist_utils.barrier()
        return result

    def _log_header(self) -> None:
        c = self.cfg
        self.logger.log(f"heartcascade training: {self.pre_dir.name} configuration={self.configuration} "
                        f"fold={self.fold} device={self.device} world_size={self.dist.world_size} seed={self.seed}")
        self.logger.log(f"splits: {self.splits_path}; {len(self.train_ids)} training cases, "
                        f"{len(self.val_ids)} validation cases ({', '.join(self.val_ids)})")
        for name in self.stages:
            st = c.steps[name]
            self.logger.log(f"step {name}: {st.kind}, {st.epochs} epochs x {st.iterations_per_epoch} iterations, "
                            f"batch {st.batch_size}, lr {st.lr:g}, losses {'+'.join(st.losses)}, trains "
                            f"{'+'.join(st.train)}" + (f", patch sizes {[list(s) for s in st.patch_shapes]}"
                                                      if st.patch_shapes else ""))
        self.logger.log(f"data augmentation workers: {self.num_workers}; AMP: "
                        f"{c.amp if self.device.type == 'cuda' else 'off (CPU)'}; compile: {self.compile}")

    # ------------------------------------------------------------------------------------------------
    # one curriculum step

    def step_runner(self, step: str) -> StepRunner:
        """The runner of ``step`` (its batch kind's loader, module and forward), made once per run."""
        if step not in self._runners:
            self._runners[step] = step_runner(self.cfg, self.cfg.steps[step], self._runner_networks)
        return self._runners[step]

    def prepare_step(self, step: str) -> None:
        """What a step computes once before its batches (step 4: frozen Net1's probabilities)."""
        self.step_runner(step).prepare(self.train_cases, self.device, self.logger.log)

    def release_step(self, step: str) -> None:
        """Drop what :meth:`prepare_step` held."""
        self.step_runner(step).release(self.train_cases)

    def build_loader(self, step: str, start_batch: int = 0) -> Any:
        """The step's seeded data loader, starting at batch ``start_batch`` (resume)."""
        self.prepare_step(step)
        st = self.cfg.steps[step]
        return self.step_runner(step).loader(
            self.train_cases, batch_size=st.batch_size, seed=self.seed, stream=[_STAGE_CODES[step], self.dist.rank],
            augmentation=self.cfg.augmentation, start_batch=start_batch, num_workers=max(1, self.num_workers),
            background_as_class=self.cfg.background_as_class)

    def build_optimizer(self, step: str, optimizer_state: Any = None, scaler_state: Any = None) -> "StepTraining":
        """Select what the step trains and build its Adam (the step's lr and weight decay) and AMP scaler.

        The result is the step :meth:`train_step` runs; ``*_state`` restore a resumed step.
        """
        st = self.cfg.steps[step]
        if self.configuration == "cascade":
            self.cascade.set_trainable("net1" in st.train, "net2" in st.train)
        runner = self.step_runner(step)
        module = runner.module
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=st.lr, weight_decay=st.weight_decay)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        use_fp16 = self.device.type == "cuda" and self.cfg.amp == "fp16"
        scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
        if scaler is not None and scaler_state:
            scaler.load_state_dict(scaler_state)
        wrapped = dist_utils.wrap_ddp(module, self.device)
        module.train()
        if self.configuration == "cascade":
            self.cascade.train()
        self._active = StepTraining(step, runner, wrapped, params, optimizer, scaler)
        return self._active

    def train_step(self, step: str, batch: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """One iteration of ``step`` on ``batch``: forward, loss terms, backward, clipping, optimizer step.

        Runs with the optimizer of the last :meth:`build_optimizer` call for this step.
        """
        active = self._active
        if active is None or active.step != step:
            raise HCError(f"train_step({step!r}) needs build_optimizer({step!r}) first")
        st = self.cfg.steps[step]
        dev = self.device
        data = torch.from_numpy(np.ascontiguousarray(batch["data"])).to(dev, non_blocking=True)
        seg = torch.from_numpy(np.ascontiguousarray(batch["seg"])).to(dev, non_blocking=True).long()
        optimizer, scaler = active.optimizer, active.scaler
        optimizer.zero_grad(set_to_none=True)
        with autocast(dev, self.cfg.amp):
            outputs = active.runner.forward(active.module, data, seg, batch)
        loss, terms = total_loss(st.losses, st.loss_weights, outputs, self.cfg.dice_weighting)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(active.params, float(self.cfg.grad_clip))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return float(loss.detach()), {n: float(t.detach()) for n, t in terms.items()}

    def _run_stage(self, index: int, start_iteration: int, optimizer_state: Any, scaler_state: Any,
                   rng_state: Any, budget_state: dict[str, Any] | None = None) -> None:
        stage = self.stages[index]
        st = self.cfg.steps[stage]
        schedule = self._step_schedule(index, budget_state)
        self.schedule = schedule
        self.prepare_step(stage)
        training = self.build_optimizer(stage, optimizer_state, scaler_state)
        optimizer, scaler = training.optimizer, training.scaler
        if start_iteration == 0:
            self.epoch_acc = {}
            self.step_best = self._step_start_candidate(stage)
            self.logger.log(f"=== step {stage} ({st.kind}): " + (
                f"{schedule.allotted_s:.0f} s of the time budget, iterations set from the measured speed ===" if
                schedule.budgeted else f"{st.iterations} iterations ==="))
        if rng_state is not None:
            restore_rng_state(rng_state)
        stream = BatchStream(self.build_loader(stage, start_iteration), self.cfg.augmentation, self.num_workers)
        bar = progress_bar(total=st.iterations, initial=start_iteration, desc=f"step {stage}", unit="it",
                           enabled=self.progress and self.dist.is_main, leave=False, dynamic_ncols=True)
        per_validation = max(1, self.cfg.validate_every_epochs) * st.iterations_per_epoch
        done = start_iteration
        try:
            while done < st.iterations:
                it = done
                t_wait = time.perf_counter()
                batch = next(stream)
                t_start = time.perf_counter()
                lr = step_learning_rate(st.lr, it, st.iterations, self.cfg.warmup_iterations, self.cfg.lr_schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, terms = self.train_step(stage, batch)
                t_end = time.perf_counter()
                self._accumulate(loss, terms, t_end - t_wait, t_start - t_wait, optimizer)
                done = it + 1
                if schedule.budgeted:
                    schedule.record_iterations(1, t_end - t_wait)
                    if done == schedule.probe or done % st.iterations_per_epoch == 0:
                        st.iterations_override = schedule.update(done, per_validation)
                    if schedule.out_of_time():
                        st.iterations_override = done
                    if bar.total != st.iterations:
                        bar.total = st.iterations
                    bar.set_description(f"step {stage} (ETA {self._eta():.0f} s)", refresh=False)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if done % st.iterations_per_epoch == 0 or done >= st.iterations:
                    self._end_epoch(stage, st, done)
                if self.callback is not None:
                    self.callback("iteration", {"stage": stage, "iteration": done, "loss": loss})
                if done < st.iterations and done % checkpoint_interval(self.cfg, st) == 0:
                    self._save("latest", index, done, optimizer, scaler)
            self._finish_step_best(stage, done)
            if schedule.budgeted:
                self.logger.log(f"step {stage}: {done} iterations in {schedule.elapsed():.0f} s "
                                f"(budget share {schedule.allotted_s:.0f} s)")
            self.logger.log(f"step {stage} finished")
            if self.configuration == "cascade":  # e.g. Net1 alone after its own last step (ablations)
                self._save(f"step{stage}", index + 1, 0, None, None, finished=True)
            self._save("latest", index + 1, 0, None, None)
        finally:
            bar.close()
            stream.close()
            self.release_step(stage)
            self._active = None

    def _step_schedule(self, index: int, budget_state: dict[str, Any] | None) -> StepSchedule:
        """The step's iteration count: the plans' without a time budget, else its share of what is left."""
        stage = self.stages[index]
        st = self.cfg.steps[stage]
        budget = self.cfg.time_budget_s
        if budget is None:
            st.iterations_override = None
            return StepSchedule(planned=st.planned_iterations)
        if budget_state is not None:  # resumed inside this step
            schedule = StepSchedule(planned=st.planned_iterations, allotted_s=budget_state["allotted_s"],
                                    probe=self.cfg.budget_probe_iterations, spent_s=float(budget_state["spent_s"]))
            schedule.iterations = int(budget_state["iterations"])
        else:
            remaining = self.stages[index:]
            left = budget - self._elapsed()
            if index == len(self.stages) - 1 and self.predict_validation and self.val_cases:
                left -= 2 * self.validation_seconds  # the final validation also fits in the budget
            allotted = step_allotment(left, stage, remaining, self.cfg.time_fractions(remaining))
            schedule = StepSchedule(planned=st.planned_iterations, allotted_s=max(0.0, allotted),
                                    probe=self.cfg.budget_probe_iterations)
        st.iterations_override = schedule.iterations
        return schedule

    def _eta(self) -> float:
        """Seconds until the whole budgeted curriculum ends (this step's deadline plus the later shares)."""
        budget = self.cfg.time_budget_s or 0.0
        return max(0.0, budget - self._elapsed())

    def _elapsed(self) -> float:
        """Seconds of this training run so far (across resumes), what the time budget is measured against."""
        return time.monotonic() - self.run_started

    def _step_start_candidate(self, stage: str) -> dict[str, Any] | None:
        """With keep_best_per_step, the weights a step starts from compete with what it trains.

        A step validated on the same target as the step before (step 2 after 1: Net1; step 4 after 3:
        the cascade) starts with the earlier step's score, so a step that only loses accuracy hands on
        the weights it was given.
        """
        if not self.cfg.keep_best_per_step:
            return None
        target = self._validation_target(stage)
        if target not in self.best_by_target:
            return None
        return {"score": self.best_by_target[target], "iteration": 0, "target": target,
                "networks": {k: state_dict_cpu(v) for k, v in self.networks.items()}}

    def _finish_step_best(self, stage: str, last_iteration: int) -> None:
        """End the step with its best-validated weights (keep_best_per_step)."""
        if not self.cfg.keep_best_per_step or not self.val_cases:
            return
        chosen = dist_utils.all_gather_object(self.step_best if self.dist.is_main else None)[0]
        self.step_best = None
        if chosen is None:
            return
        self.best_by_target[chosen["target"]] = float(chosen["score"])
        if chosen["iteration"] == last_iteration:
            return
        for key, net in self.networks.items():
            net.load_state_dict(chosen["networks"][key])
        self.logger.log(f"step {stage}: keeping the weights of iteration {chosen['iteration']} (validation Dice "
                        f"{chosen['score']:.4f}); the step's last weights validated lower")
        self.logger.record(type="restore", stage=stage, iteration=last_iteration, restored_iteration=chosen["iteration"],
                           global_iteration=self._global_iteration(stage, last_iteration), mean_dice=chosen["score"])

    # ------------------------------------------------------------------------------------------------
    # epochs, validation, best checkpoint

    def _accumulate(self, loss: float, terms: dict[str, float], seconds: float, wait: float,
                    optimizer: torch.optim.Optimizer) -> None:
        acc = self.epoch_acc
        acc["n"] = acc.get("n", 0) + 1
        acc["loss"] = acc.get("loss", 0.0) + loss
        acc["seconds"] = acc.get("seconds", 0.0) + seconds
        acc["wait"] = acc.get("wait", 0.0) + wait
        acc["lr"] = optimizer.param_groups[0]["lr"]
        t = acc.setdefault("terms", {})
        for k, v in terms.items():
            t[k] = t.get(k, 0.0) + v

    def _global_iteration(self, stage: str, iteration: int) -> int:
        total = 0
        for s in self.stages:
            if s == stage:
                return total + iteration
            total += self.cfg.steps[s].iterations
        return total + iteration

    def _end_epoch(self, stage: str, st: StepConfig, iteration: int) -> None:
        acc = self.epoch_acc
        n = max(1, acc.get("n", 0))
        means = dist_utils.all_reduce_mean([acc.get("loss", 0.0) / n] +
                                           [v / n for v in acc.get("terms", {}).values()], self.device)
        terms = dict(zip(acc.get("terms", {}).keys(), means[1:]))
        sec = acc.get("seconds", 0.0) / n
        wait = acc.get("wait", 0.0) / max(acc.get("seconds", 0.0), 1e-9)
        epoch = math.ceil(iteration / st.iterations_per_epoch)
        self.epoch_losses.setdefault(stage, []).append(means[0])
        self.seconds.setdefault(stage, []).append(sec)
        self.logger.record(type="train", stage=stage, iteration=iteration,
                           global_iteration=self._global_iteration(stage, iteration), epoch=epoch, loss=means[0],
                           loss_terms=terms, lr=acc.get("lr"), seconds_per_iteration=sec, data_wait_fraction=wait)
        self.logger.log(f"step {stage} epoch {epoch}/{math.ceil(st.iterations / st.iterations_per_epoch)} "
                        f"(it {iteration}): loss {means[0]:.4f} "
                        f"({', '.join(f'{k} {v:.4f}' for k, v in terms.items())}), {sec:.3f} s/it, "
                        f"data wait {100 * wait:.0f}%" + (f", run ends in {self._eta():.0f} s"
                                                          if self.schedule is not None and self.schedule.budgeted else ""))
        self.epoch_acc = {}
        if self.val_cases and (epoch % max(1, self.cfg.validate_every_epochs) == 0 or iteration >= st.iterations):
            t0 = time.perf_counter()
            self._validate(stage, iteration)
            self.validation_seconds = time.perf_counter() - t0
            if self.schedule is not None and self.schedule.budgeted:
                self.schedule.record_validation(self.validation_seconds)
        if self.dist.is_main:
            self.logger.flush(plot=False)

    def _validation_target(self, stage: str) -> str:
        if self.configuration == "baseline":
            return "baseline"
        return "cascade" if stage in ("3", "4") else "net1"

    def _validate(self, stage: str, iteration: int) -> None:
        if not self.dist.is_main:
            dist_utils.barrier()
            return
        target = self._validation_target(stage)
        dice = self.validation_dice(target)
        names = self.cfg.class_names
        fg = dice[1:]
        mean = float(np.nanmean(fg)) if np.any(np.isfinite(fg)) else 0.0
        best = self.best
        if best.get("target") != target:
            best.update(target=target, ema=None, best_ema=None)
        m = self.cfg.ema_momentum
        best["ema"] = mean if best.get("ema") is None else m * best["ema"] + (1 - m) * mean
        improved = best.get("best_ema") is None or best["ema"] > best["best_ema"]
        per_class = {names[c] if c < len(names) else str(c): (None if not np.isfinite(dice[c]) else float(dice[c]))
                     for c in range(1, len(dice))}
        self.last_validation = {"stage": stage, "iteration": iteration, "target": target, "dice": per_class,
                                "mean_dice": mean}
        if self.cfg.keep_best_per_step and (self.step_best is None or mean > self.step_best["score"]):
            self.step_best = {"score": mean, "iteration": iteration, "target": target,
                              "networks": {k: state_dict_cpu(v) for k, v in self.networks.items()}}
        self.logger.record(type="val", stage=stage, iteration=iteration,
                           global_iteration=self._global_iteration(stage, iteration), target=target,
                           dice=per_class, mean_dice=mean, ema=best["ema"])
        self.logger.log(f"validation ({target}, {len(self.val_cases)} cases): mean Dice {mean:.4f} "
                        f"(moving avg {best['ema']:.4f}); " + ", ".join(
                            f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in per_class.items()))
        if improved:
            best.update(best_ema=best["ema"], stage=stage, iteration=iteration)
            self.logger.log(f"new best moving-average Dice {best['ema']:.4f} -> checkpoint_best.pth")
            save_checkpoint(checkpoint_path(self.output_folder, "best"),
                            self._state("best", self.stages.index(stage), iteration, None, None, None))
        dist_utils.barrier()

    def validation_dice(self, target: str) -> np.ndarray:
        """Mean hard Dice per class of the validation cases, by the real predictor on copies of the networks
        (:mod:`heartcascade.training.validation`); ``target == "net1"`` scores Net1 alone."""
        predictor = validation_predictor(self.configuration, self.plans, self.networks, self.device)
        try:
            return validation_dice(predictor, self.val_cases, target, self.cfg.num_classes)
        finally:
            for net in self.networks.values():
                net.train()
            if self.configuration == "cascade":
                self.cascade.train()

    def _final_validation(self) -> tuple[dict[str, Any] | None, str | None]:
        """Predict the fold's validation cases from the model folder's final checkpoint and evaluate them."""
        predictor = Predictor.from_model_dir(self.output_folder, checkpoint="final", device=str(self.device),
                                             configuration=self.configuration, postprocessing=None)
        ending = ".nii.gz"
        if self.dataset_json_path.is_file():
            ending = str(load_json(self.dataset_json_path).get("file_ending", ending))
        try:
            return run_final_validation(self.output_folder, predictor, list(self.val_ids),
                                        raw_dataset_dir(raw_root(), self.pre_dir.name), self.data_dir,
                                        self.logger.log, ending)
        finally:
            self.logger.flush()


def train(dataset: int | str, fold: int | str, **kwargs: Any) -> TrainingResult:
    """Functional form: ``train(1, 0, configuration="cascade", steps=[1, 2, 3, 4])``."""
    return Trainer(dataset, fold, **kwargs).run()
