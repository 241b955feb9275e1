"""A training session: the run's plans, cases and networks, and the pieces of one curriculum step.

:class:`TrainingSession` reads what a run trains on (:meth:`~TrainingSession.setup`) and gives, per step,
the seeded loader (:meth:`~TrainingSession.build_loader`), the optimizer and AMP scaler
(:meth:`~TrainingSession.build_optimizer`) and one iteration (:meth:`~TrainingSession.train_step`),
through the step's runner (:mod:`heartcascade.training.steps`) and the loss table
(:mod:`heartcascade.losses.terms`). :class:`heartcascade.training.trainer.Trainer` runs the curriculum
with these; the benchmark and ``scripts/benchmark_loader.py`` time them, so what they measure is what
training runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from heartcascade.inference.pretrained import load_model_weights
from heartcascade.losses.terms import total_loss
from heartcascade.model.checkpoint import checkpoint_path, load_checkpoint
from heartcascade.networks.blocks import init_classifier_bias
from heartcascade.paths import results_root
from heartcascade.planning.plans import BASELINE_STEP, parse_plans
from heartcascade.preprocessing.storage import data_dir
from heartcascade.training import distributed as dist_utils
from heartcascade.training.cases import load_train_case
from heartcascade.training.dataloading import default_num_workers
from heartcascade.training.finetune import initialise_from
from heartcascade.training.logger import TrainingLogger
from heartcascade.training.models import model_class
from heartcascade.training.results import Callback
from heartcascade.training.memory_check import check_training_memory
from heartcascade.training.run_inputs import (check_resume, data_plans_hash, find_preprocessed, labelled_cases,
                                              parse_override, run_plans)
from heartcascade.training.splits import fold_cases, fold_folder_name, load_or_create_splits, parse_fold
from heartcascade.training.steps import StepRunner, StepTraining, check_losses
from heartcascade.training.time_budget import parse_duration
from heartcascade.utils.device import autocast, resolve_device
from heartcascade.utils.errors import HCError

#: Data-stream id of each step (the loaders' seeds are [seed, stream, rank]).
STREAM_CODES = {"1": 1, "2": 2, "3": 3, "4": 4, BASELINE_STEP: 9}


def training_threads(plans_threads: int | None, num_workers: int, load: float | None = None) -> int:
    """CPU intra-op threads while training: the plans' ``training.num_threads``, else a rule for the
    machine as it is when training starts.

    Idle machine (1-minute load below ``cpus - 0.5``): every thread torch uses -- a second OpenMP thread
    buys 1.05-1.6x the wall speed there. Busy machine (other jobs hold the cores): the CPUs the loader
    workers leave free (``cpus - workers``, at least 1), because OpenMP threads then spin while
    descheduled: 1.5-5x the CPU time for no wall gain, and 1 thread gave 2.5-2.7x the iterations per
    wall-minute at load 9-15 on 2 cores (issue #16, documentation/benchmarks.md "CPU training speed").
    Never more than torch already uses.
    """
    current = torch.get_num_threads()
    cpus = os.cpu_count() or 1
    if plans_threads is not None:
        return max(1, min(int(plans_threads), cpus))
    if load is None or load < cpus - 0.5:  # unknown load: as on an idle machine
        return max(1, current)
    return max(1, min(current, cpus - max(0, int(num_workers))))


class TrainingSession:
    """One fold of one configuration, ready to train step by step (the :class:`Trainer` runs it all).

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
        time_budget: wall-clock budget of the curriculum (``"60m"``, ``"1.5h"``, seconds); default the
            plans' ``training.time_budget_s``. The steps share it by their ``time_fraction``; each step's
            iteration count is set from its measured speed (see :mod:`heartcascade.training.time_budget`).
            It belongs to the run: saved in the checkpoints (``budget``), not written into the plans.
        pretrained: start the networks from this trained model (a model zip, a model or fold folder, or a
            ``.pth`` checkpoint) instead of a random initialisation: fine-tuning. Its plans must be
            compatible (:func:`heartcascade.training.finetune.check_finetune_compatible`); a resumed run
            continues from its own checkpoint instead.
    """

    def __init__(self, dataset: int | str, fold: int | str, configuration: str = "cascade",
                 steps: Sequence[int | str] | None = None, continue_training: bool = False, device: str = "auto",
                 compile: bool = False, num_workers: int | None = None,
                 plans_override: str | dict[str, Any] | None = None, splits_file: str | Path | None = None,
                 seed: int | None = None, predict_validation: bool = True, progress: bool = True,
                 callback: Callback | None = None, output_folder: str | Path | None = None,
                 time_budget: str | float | None = None, pretrained: str | Path | None = None) -> None:
        self.model_class = model_class(configuration)
        self.dataset = dataset
        self.fold_arg = fold
        self.configuration = configuration
        self.requested_steps = None if steps is None else [str(s).strip() for s in steps]
        if self.requested_steps is not None:
            if not self.model_class.selectable_steps:
                raise HCError(f"--steps applies to the cascade; the {configuration} has a single step")
            bad = [s for s in self.requested_steps if s not in self.model_class.default_steps]
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
        self.time_budget_arg = None if time_budget is None else parse_duration(time_budget)
        self.pretrained = None if pretrained is None else Path(pretrained)
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
        labelled = self.case_ids = labelled_cases(self.pre_dir, self.data_dir)
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
        self.data_plans_hash = data_plans_hash(self.pre_dir)
        if self.continue_training and latest.is_file():
            resume = load_checkpoint(latest)
            check_resume(resume, latest, self.configuration, labelled, self.data_dir, self.requested_steps,
                         self.data_plans_hash)
            self.plans = parse_plans(resume["plans"], str(latest))
            self.seed = int(resume.get("seed", 0))
            self.step_names = list(resume["steps"])
            self.train_ids = list(resume.get("train_cases", self.train_ids))
            self.val_ids = [c for c in resume.get("val_cases", self.val_ids) if c in labelled]
        else:
            self.plans = run_plans(self.pre_dir, self.plans_override)
            self.step_names = self.requested_steps or list(self.model_class.default_steps)
        #: the configuration's steps by name ("1".."4" or "baseline"): the plans' own entries
        self.steps = self.plans.training_steps(self.configuration)
        check_losses(self.steps)
        training = self.plans.training
        if resume is None:
            self.seed = training.seed if self.seed_arg is None else self.seed_arg
            self.time_budget_s = training.time_budget_s if self.time_budget_arg is None else self.time_budget_arg
        else:
            self.time_budget_s = (resume.get("budget") or {}).get("time_budget_s")
        self.step_names = [s for s in self.step_names if self.steps[s].planned_iterations > 0]
        if not self.step_names:
            raise HCError("nothing to train: every selected step has 0 epochs or is disabled in the plans")
        check_training_memory(self.plans, {s: self.steps[s] for s in self.step_names}, self.device)
        self.num_workers = self.num_workers_arg if self.num_workers_arg is not None \
            else default_num_workers(training.num_workers)
        if self.device.type == "cpu":
            self.threads_before = torch.get_num_threads()
            self.threads_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            torch.set_num_threads(training_threads(training.num_threads, self.num_workers, self.threads_load))
        self.dataset_json_path = self.pre_dir / "dataset.json"
        self.logger = TrainingLogger(self.output_folder, enabled=self.dist.is_main, echo=self.progress,
                                     class_names=self.plans.class_names)
        return resume

    def _load_cases(self) -> None:
        self.train_cases = [load_train_case(self.data_dir, c) for c in self.train_ids]
        val_ids = self.val_ids
        if self.plans.training.val_max_cases is not None:
            val_ids = val_ids[: self.plans.training.val_max_cases]
        self.val_cases = [load_train_case(self.data_dir, c) for c in val_ids]  # preprocessed grid (memory-mapped)
        self.train_cases = self.model_class.training_cases(self.train_cases, self.plans)

    def _build_networks(self) -> None:
        torch.manual_seed(self.seed)
        self.model = self.model_class(self.plans, self.device)
        self.networks: dict[str, nn.Module] = self.model.networks
        fractions = self.plans.report.fingerprint_summary.class_fractions
        if self.plans.training.classifier_bias_init == "class_prior" and fractions:
            for net in self.networks.values():
                init_classifier_bias(net.classifier, list(fractions))
        if self.pretrained is not None and self._resume is None:
            self._initialise_from_pretrained()
        if self.device.type == "cpu":
            # The 3D U-Nets (Net1, the baseline) train 1.3-1.5x faster in channels-last-3d on the CPU
            # (oneDNN's blocked convolutions); Net2's thin slabs do not gain (issue #16,
            # documentation/benchmarks.md "CPU training speed"). Parameters only: activations follow.
            for key in ("net1", "baseline"):
                if key in self.networks:
                    self.networks[key].to(memory_format=torch.channels_last_3d)
        if self.compile:
            # In place (state_dict keys unchanged), static shapes: one graph per patch shape.
            for net in self.networks.values():
                net.compile(dynamic=False)

    def _initialise_from_pretrained(self) -> None:
        assert self.pretrained is not None
        model = load_model_weights(self.pretrained)
        initialise_from(self.networks, model, self.plans, self.configuration, self.pretrained)
        for net in self.networks.values():
            net.to(self.device)
        self.logger.log(f"networks initialised from {self.pretrained} (fold {model.name} of its "
                        f"{model.plans.report.dataset.name} model): fine-tuning")

    # ------------------------------------------------------------------------------------------------
    # one curriculum step

    def step_runner(self, step: str) -> StepRunner:
        """The runner of ``step`` (its input's loader, module and forward), made once per run."""
        if step not in self._runners:
            self._runners[step] = self.model.runner(self.plans, self.steps[step])
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
        st = self.steps[step]
        return self.step_runner(step).loader(
            self.train_cases, batch_size=st.batch_size, seed=self.seed, stream=[STREAM_CODES[step], self.dist.rank],
            augmentation=self.plans.augmentation, start_batch=start_batch, num_workers=max(1, self.num_workers),
            background_as_class=self.plans.sampling.background_as_class)

    def build_optimizer(self, step: str, optimizer_state: Any = None, scaler_state: Any = None) -> "StepTraining":
        """Select what the step trains and build its Adam (the step's lr and weight decay) and AMP scaler.

        The result is the step :meth:`train_step` runs; ``*_state`` restore a resumed step.
        """
        st = self.steps[step]
        self.model.select(st)
        runner = self.step_runner(step)
        module = runner.module
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=st.lr, weight_decay=self.plans.training.weight_decay)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        use_fp16 = self.device.type == "cuda" and self.plans.amp == "fp16"
        scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
        if scaler is not None and scaler_state:
            scaler.load_state_dict(scaler_state)
        wrapped = dist_utils.wrap_ddp(module, self.device)
        module.train()
        self.model.train()
        self._active = StepTraining(step, runner, wrapped, params, optimizer, scaler)
        return self._active

    def train_step(self, step: str, batch: dict[str, Any],
                   mark: Callable[[str], None] | None = None) -> tuple[float, dict[str, float]]:
        """One iteration of ``step`` on ``batch``: forward, loss terms, backward, clipping, optimizer step.

        Runs with the optimizer of the last :meth:`build_optimizer` call for this step. ``mark`` (profiling,
        scripts/profile_training.py) is called with each phase's name as the phase ends: copy, forward, loss,
        backward, clip, optimizer.
        """
        mark = mark or (lambda phase: None)
        active = self._active
        if active is None or active.step != step:
            raise HCError(f"train_step({step!r}) needs build_optimizer({step!r}) first")
        st = self.steps[step]
        dev = self.device
        data = torch.from_numpy(np.ascontiguousarray(batch["data"])).to(dev, non_blocking=True)
        seg = torch.from_numpy(np.ascontiguousarray(batch["seg"])).to(dev, non_blocking=True).long()
        optimizer, scaler = active.optimizer, active.scaler
        optimizer.zero_grad(set_to_none=True)
        mark("copy")
        with autocast(dev, self.plans.amp):
            outputs = active.runner.forward(active.module, data, seg, batch)
        mark("forward")
        loss, terms = total_loss(st.losses, st.loss_weights or {}, outputs, self.plans.training.dice_weighting)
        mark("loss")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        mark("backward")
        if self.plans.training.grad_clip:
            torch.nn.utils.clip_grad_norm_(active.params, float(self.plans.training.grad_clip))
        mark("clip")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        result = float(loss.detach()), {n: float(t.detach()) for n, t in terms.items()}
        mark("optimizer")
        return result
