"""The trainer: the paper's four-step curriculum for the cascade, and the 2 mm baseline U-Net.

Programmatic use (what ``hc_train`` and ``hc_demo`` call)::

    from heartcascade.training.trainer import Trainer
    result = Trainer(dataset=1, fold=0, configuration="cascade").run()
    result.output_folder, result.final_checkpoint, result.validation_summary

The trainer runs the steps of the plans' ``training.steps`` (paper Table 1; batches, modules and outputs
per step kind: :mod:`heartcascade.training.steps`; loss terms: :mod:`heartcascade.losses.terms`), each
with a fresh Adam optimiser. The loop itself is generic; a step's pieces are public
(:meth:`Trainer.setup`, :meth:`~Trainer.build_loader`, :meth:`~Trainer.build_optimizer`,
:meth:`~Trainer.train_step`) so the benchmark times exactly what training runs. Checkpoints
(``checkpoint_latest.pth`` every ``training.checkpoint_interval_iterations`` iterations, else every
``checkpoint_interval_epochs`` epochs, and at the end of every step; ``checkpoint_best.pth`` when the moving
average of the validation Dice improves (:mod:`heartcascade.training.best`), ``checkpoint_final.pth`` at the end) are written atomically and hold
the complete resume state, so ``continue_training=True`` continues bit-for-bit where the last checkpoint
was taken (same batches, same dropout masks, same optimiser state).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np
import torch

from heartcascade.inference.predictor import Predictor
from heartcascade.paths import raw_root
from heartcascade.training import distributed as dist_utils
from heartcascade.training.best import BestTracker
from heartcascade.model.checkpoint import FORMAT_VERSION, checkpoint_path, plain, save_checkpoint, state_dict_cpu
from heartcascade.training.checkpoint import capture_rng_state, optimizer_state_cpu, restore_rng_state
from heartcascade.planning.plans import StepPlan
from heartcascade.training.dataloading import BatchStream
from heartcascade.training.final_validation import raw_dataset_dir, run_final_validation
from heartcascade.training.results import StopTraining, TrainingResult
from heartcascade.training.run_inputs import check_data_unchanged
from heartcascade.training.session import TrainingSession
from heartcascade.training.time_budget import StepSchedule, step_learning_rate, step_schedule
from heartcascade.training.validation import validation_dice, validation_predictor
from heartcascade.utils.atomic import atomic_write_bytes, atomic_write_json
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json
from heartcascade.utils.progress import progress_bar
from heartcascade.utils.run_lock import describe, live_holder, run_lock

__all__ = ["StopTraining", "Trainer", "TrainingResult", "step_learning_rate", "train"]


class Trainer(TrainingSession):
    """Train one fold of one configuration: the curriculum loop, checkpoints, resume, validation and the
    time budget around the step pieces of :class:`~heartcascade.training.session.TrainingSession`
    (arguments there; see documentation/training.md)."""

    # ------------------------------------------------------------------------------------------------
    # checkpoints

    def _state(self, kind: str, step_index: int, iteration: int, optimizer: torch.optim.Optimizer | None,
               scaler: Any, rng_states: list[Any] | None, finished: bool = False) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "configuration": self.configuration,
            "plans": self.plans.to_dict(),
            "networks": {k: state_dict_cpu(v) for k, v in self.networks.items()},
            "kind": kind,
            "steps": list(self.step_names),
            "step_index": int(step_index),
            "step": self.step_names[step_index] if step_index < len(self.step_names) else None,
            "iteration": int(iteration),
            "finished": bool(finished),
            "optimizer": optimizer_state_cpu(optimizer) if optimizer is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states,
            "logger": self.logger.state(),
            **self.tracker.state(kind),
            "budget": {"time_budget_s": self.time_budget_s, "elapsed_s": self._elapsed(),
                       "step": self.schedule.state() if self.schedule is not None and not finished else None,
                       "iterations": dict(self.iterations)},
            "epoch_acc": plain(self.epoch_acc),
            "fold": str(self.fold),
            "seed": self.seed,
            "world_size": self.dist.world_size,
            "train_cases": list(self.train_ids),
            "val_cases": list(self.val_ids),
            "torch_version": str(torch.__version__),
            **({"pretrained": str(self.pretrained)} if self.pretrained is not None else {}),
            "data_plans_hash": self.data_plans_hash,
        }

    def _save(self, kind: str, step_index: int, iteration: int, optimizer: torch.optim.Optimizer | None,
              scaler: Any, finished: bool = False) -> None:
        rng_states = dist_utils.all_gather_object(capture_rng_state()) if kind == "latest" else None
        if self.dist.is_main:
            check_data_unchanged(self.data_plans_hash, self.pre_dir, self.output_folder)
            self.logger.flush(plot=not kind.startswith("step"))
            state = self._state(kind, step_index, iteration, optimizer, scaler, rng_states, finished)
            save_checkpoint(checkpoint_path(self.output_folder, kind), state)
        dist_utils.barrier()
        if self.callback is not None:
            self.callback("checkpoint", {"kind": kind, "step_index": step_index, "iteration": iteration})

    def _take_locks(self) -> None:
        """One run per fold: the fold folder's lock (utils/run_lock.py) for the whole run; none while
        hc_plan_and_preprocess rewrites this dataset."""
        holder = live_holder(self.pre_dir)
        if holder is not None:
            raise HCError(f"{self.pre_dir}: hc_plan_and_preprocess is rewriting the preprocessed data "
                          f"({describe(holder)}); train when it has finished")
        self._locks.enter_context(run_lock(self.output_folder, f"hc_train of {self.configuration} fold {self.fold}"))

    # ------------------------------------------------------------------------------------------------
    # main entry

    def run(self) -> TrainingResult:
        try:
            with contextlib.ExitStack() as self._locks:
                return self._run()
        finally:
            dist_utils.cleanup()
            before = getattr(self, "threads_before", None)
            if before is not None:  # the session lowered them for training (training_threads)
                torch.set_num_threads(before)

    def _run(self) -> TrainingResult:
        started = time.monotonic()
        self.setup()
        resume = self._resume
        if self.dist.is_main:
            self._take_locks()
            self.output_folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.output_folder / "plans.json", self.plans.to_dict())
            if self.dataset_json_path.is_file():
                atomic_write_bytes(self.output_folder / "dataset.json", self.dataset_json_path.read_bytes())
        self.tracker = BestTracker(self.plans.training.ema_momentum, self.plans.training.keep_best_per_step)
        self.epoch_acc: dict[str, Any] = {}
        self.epoch_losses: dict[str, list[float]] = {}
        self.seconds: dict[str, list[float]] = {}
        self.last_validation: dict[str, Any] | None = None
        self.run_started = started  # the time budget counts from here (resume: minus the time spent)
        self.validation_seconds = 0.0  # the last in-training validation's duration (final-validation reserve)
        self.schedule: StepSchedule | None = None
        #: each step's iteration count: the plans' without a time budget, else the schedule's (trainer state)
        self.iterations = {name: st.planned_iterations for name, st in self.steps.items()}
        budget_state: dict[str, Any] | None = None
        step_index, start_iteration = 0, 0
        resume_optimizer = resume_scaler = None
        rng_to_restore = None
        if resume is not None:
            for key, net in self.networks.items():
                net.load_state_dict(resume["networks"][key])
            self.logger.load_state(resume.get("logger", {}))
            self.tracker.load_state(resume)
            self.epoch_acc = dict(resume.get("epoch_acc") or {})
            budget = resume.get("budget") or {}
            self.run_started -= float(budget.get("elapsed_s") or 0.0)
            budget_state = budget.get("step")
            self.iterations.update({k: int(v) for k, v in (budget.get("iterations") or {}).items() if k in self.iterations})
            step_index, start_iteration = int(resume["step_index"]), int(resume["iteration"])
            resume_optimizer, resume_scaler = resume.get("optimizer"), resume.get("scaler")
            states = resume.get("rng") or []
            if states:
                rng_to_restore = states[self.dist.rank] if self.dist.rank < len(states) else states[0]
            where = ("all steps done" if step_index >= len(self.step_names)
                     else f"step {resume['step']} iteration {start_iteration}")
            self.logger.log(f"resuming from {checkpoint_path(self.output_folder, 'latest')}: {where}")
        else:
            self._log_header()
            if self.continue_training:
                self.logger.log(f"--continue: no {checkpoint_path(self.output_folder, 'latest').name} in "
                                f"{self.output_folder}, starting from scratch")
            elif checkpoint_path(self.output_folder, "latest").is_file():
                self.logger.log(f"note: replacing the earlier run in {self.output_folder} (use --continue to resume it)")
        for record in self.logger.records:
            if record.get("type") == "train":
                self.epoch_losses.setdefault(str(record["step"]), []).append(record["loss"])

        for index in range(step_index, len(self.step_names)):
            first = index == step_index
            self._run_step(index, start_iteration if first else 0,
                           resume_optimizer if first else None, resume_scaler if first else None,
                           rng_to_restore if first else None, budget_state if first else None)
        if resume is None or step_index < len(self.step_names) or not checkpoint_path(self.output_folder, "final").is_file():
            self._save("final", len(self.step_names), 0, None, None, finished=True)
            self._save("latest", len(self.step_names), 0, None, None, finished=True)
        result = TrainingResult(self.output_folder, self.configuration, str(self.fold), list(self.step_names),
                                checkpoint_path(self.output_folder, "final"), self.epoch_losses,
                                self.last_validation,
                                {k: float(np.mean(v)) for k, v in self.seconds.items() if v})
        if self.predict_validation and self.dist.is_main:
            summary, method = self._final_validation()
            result.validation_summary, result.validation_method = summary, method
        dist_utils.barrier()
        return result

    def _log_header(self) -> None:
        self.logger.log(f"heartcascade training: {self.pre_dir.name} configuration={self.configuration} "
                        f"fold={self.fold} device={self.device} world_size={self.dist.world_size} seed={self.seed}")
        self.logger.log(f"splits: {self.splits_path}; {len(self.train_ids)} training cases, "
                        f"{len(self.val_ids)} validation cases ({', '.join(self.val_ids)})")
        if self.fold == "all":
            self.logger.log("fold all: every case trains and none is held out, so there is no validation Dice, "
                            "no keep-best and no postprocessing choice (train a numbered fold for those)")
        if self.device.type == "cpu":
            load = getattr(self, "threads_load", None)
            self.logger.log(f"CPU threads: {torch.get_num_threads()} ({self.num_workers} loader worker(s), "
                            f"1-min load {'?' if load is None else f'{load:.1f}'}; training.num_threads="
                            f"{self.plans.training.num_threads})")
        for name in self.step_names:
            st = self.steps[name]
            self.logger.log(f"step {name}: {st.input}, {st.epochs} epochs x {st.iterations_per_epoch} iterations, "
                            f"batch {st.batch_size}, lr {st.lr:g}, losses {'+'.join(st.losses)}, trains "
                            f"{'+'.join(st.train)}" + (f", patch sizes {[list(s) for s in st.shapes]}"
                                                      if st.shapes else ""))
        self.logger.log(f"data augmentation workers: {self.num_workers}; AMP: "
                        f"{self.plans.amp if self.device.type == 'cuda' else 'off (CPU)'}; compile: {self.compile}")

    def _run_step(self, index: int, start_iteration: int, optimizer_state: Any, scaler_state: Any,
                  rng_state: Any, budget_state: dict[str, Any] | None = None) -> None:
        step_name = self.step_names[index]
        st = self.steps[step_name]
        schedule = self._step_schedule(index, budget_state)
        self.schedule = schedule
        self.iterations[step_name] = schedule.iterations
        self.prepare_step(step_name)
        training = self.build_optimizer(step_name, optimizer_state, scaler_state)
        optimizer, scaler = training.optimizer, training.scaler
        if start_iteration == 0:
            self.epoch_acc = {}
            self.tracker.start_step(self.model.validation_target(step_name), self.networks)
            self.logger.log(f"=== step {step_name} ({st.input}): " + (
                f"{schedule.allotted_s:.0f} s of the time budget, iterations set from the measured speed ===" if
                schedule.budgeted else f"{self.iterations[step_name]} iterations ==="))
        if rng_state is not None:
            restore_rng_state(rng_state)
        stream = BatchStream(self.build_loader(step_name, start_iteration), self.plans.augmentation, self.num_workers)
        bar = progress_bar(total=self.iterations[step_name], initial=start_iteration, desc=f"step {step_name}", unit="it",
                           enabled=self.progress and self.dist.is_main, leave=False, dynamic_ncols=True)
        per_validation = max(1, self.plans.training.validation_interval_epochs) * st.iterations_per_epoch
        done = start_iteration
        try:
            while done < self.iterations[step_name]:
                it = done
                t_wait = time.perf_counter()
                batch = next(stream)
                t_start = time.perf_counter()
                lr = step_learning_rate(st.lr, it, self.iterations[step_name], self.plans.training.warmup_iterations,
                                        self.plans.training.lr_schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, terms = self.train_step(step_name, batch)
                t_end = time.perf_counter()
                self._accumulate(loss, terms, t_end - t_wait, t_start - t_wait, optimizer)
                done = it + 1
                if schedule.budgeted:
                    schedule.record_iterations(1, t_end - t_wait)
                    if done == schedule.probe or done % st.iterations_per_epoch == 0:
                        self.iterations[step_name] = schedule.update(done, per_validation)
                    if schedule.out_of_time():
                        self.iterations[step_name] = done
                    if bar.total != self.iterations[step_name]:
                        bar.total = self.iterations[step_name]
                    bar.set_description(f"step {step_name} (ETA {self._eta():.0f} s)", refresh=False)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if done % st.iterations_per_epoch == 0 or done >= self.iterations[step_name]:
                    self._end_epoch(step_name, st, done)
                if self.callback is not None:
                    self.callback("iteration", {"step": step_name, "iteration": done, "loss": loss})
                if done < self.iterations[step_name] and done % self.plans.training.checkpoint_interval(st) == 0:
                    self._save("latest", index, done, optimizer, scaler)
            self._finish_step_best(step_name, done)
            if schedule.budgeted:
                self.logger.log(f"step {step_name}: {done} iterations in {schedule.elapsed():.0f} s "
                                f"(budget share {schedule.allotted_s:.0f} s)")
            self.logger.log(f"step {step_name} finished")
            if self.model.step_checkpoints:  # e.g. Net1 alone after its own last step (ablations)
                self._save(f"step{step_name}", index + 1, 0, None, None, finished=True)
            self._save("latest", index + 1, 0, None, None)
        finally:
            bar.close()
            stream.close()
            self.release_step(step_name)
            self._active = None

    def _step_schedule(self, index: int, budget_state: dict[str, Any] | None) -> StepSchedule:
        """The step's iteration count: the plans' without a time budget, else its share of what is left."""
        last = index == len(self.step_names) - 1 and self.predict_validation and self.val_cases
        reserve = 2 * self.validation_seconds if last else 0.0  # the final validation also fits in the budget
        budget = self.time_budget_s
        left = None if budget is None else budget - self._elapsed() - reserve
        return step_schedule(self.steps, self.plans.training.budget_probe_iterations, self.step_names[index:], left,
                             budget_state)

    def _eta(self) -> float:
        """Seconds until the whole budgeted curriculum ends (this step's deadline plus the later shares)."""
        budget = self.time_budget_s or 0.0
        return max(0.0, budget - self._elapsed())

    def _elapsed(self) -> float:
        """Seconds of this training run so far (across resumes), what the time budget is measured against."""
        return time.monotonic() - self.run_started

    def _finish_step_best(self, step_name: str, last_iteration: int) -> None:
        """End the step with its best-validated weights (keep_best_per_step)."""
        if not self.plans.training.keep_best_per_step or not self.val_cases:
            return
        chosen = self.tracker.finish_step(
            dist_utils.all_gather_object(self.tracker.step_best if self.dist.is_main else None)[0])
        if chosen is None or chosen["iteration"] == last_iteration:
            return
        for key, net in self.networks.items():
            net.load_state_dict(chosen["networks"][key])
        self.logger.log(f"step {step_name}: keeping the weights of iteration {chosen['iteration']} (validation Dice "
                        f"{chosen['score']:.4f}); the step's last weights validated lower")
        self.logger.record(type="restore", step=step_name, iteration=last_iteration, restored_iteration=chosen["iteration"],
                           global_iteration=self._global_iteration(step_name, last_iteration), mean_dice=chosen["score"])

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

    def _global_iteration(self, step_name: str, iteration: int) -> int:
        total = 0
        for s in self.step_names:
            if s == step_name:
                return total + iteration
            total += self.iterations[s]
        return total + iteration

    def _end_epoch(self, step_name: str, st: StepPlan, iteration: int) -> None:
        acc = self.epoch_acc
        n = max(1, acc.get("n", 0))
        means = dist_utils.all_reduce_mean([acc.get("loss", 0.0) / n] +
                                           [v / n for v in acc.get("terms", {}).values()], self.device)
        terms = dict(zip(acc.get("terms", {}).keys(), means[1:]))
        sec = acc.get("seconds", 0.0) / n
        wait = acc.get("wait", 0.0) / max(acc.get("seconds", 0.0), 1e-9)
        epoch = math.ceil(iteration / st.iterations_per_epoch)
        self.epoch_losses.setdefault(step_name, []).append(means[0])
        self.seconds.setdefault(step_name, []).append(sec)
        self.logger.record(type="train", step=step_name, iteration=iteration,
                           global_iteration=self._global_iteration(step_name, iteration), epoch=epoch, loss=means[0],
                           loss_terms=terms, lr=acc.get("lr"), seconds_per_iteration=sec, data_wait_fraction=wait)
        total = self.iterations[step_name]
        budgeted = self.schedule is not None and self.schedule.budgeted
        where = (f"iteration {iteration}/{total} (as many as fit: {self.schedule.remaining():.0f} s left in the step, "
                 f"{self._eta():.0f} s in the run)" if budgeted and self.schedule is not None
                 else f"epoch {epoch}/{math.ceil(total / st.iterations_per_epoch)} (it {iteration})")
        self.logger.log(f"step {step_name} {where}: loss {means[0]:.4f} "
                        f"({', '.join(f'{k} {v:.4f}' for k, v in terms.items())}), {sec:.3f} s/it, "
                        f"data wait {100 * wait:.0f}%")
        self.epoch_acc = {}
        if self.val_cases and (epoch % max(1, self.plans.training.validation_interval_epochs) == 0 or iteration >= total):
            t0 = time.perf_counter()
            self._validate(step_name, iteration)
            self.validation_seconds = time.perf_counter() - t0
            if self.schedule is not None and self.schedule.budgeted:
                self.schedule.record_validation(self.validation_seconds)
        if self.dist.is_main:
            self.logger.flush(plot=False)

    def _validate(self, step_name: str, iteration: int) -> None:
        if not self.dist.is_main:
            dist_utils.barrier()
            return
        target = self.model.validation_target(step_name)
        dice = self.validation_dice(target)
        names = self.plans.class_names
        fg = dice[1:]
        mean = float(np.nanmean(fg)) if np.any(np.isfinite(fg)) else 0.0
        improved = self.tracker.record(target, mean, step_name, iteration, self.networks)
        ema = self.tracker.best["ema"]
        per_class = {names[c] if c < len(names) else str(c): (None if not np.isfinite(dice[c]) else float(dice[c]))
                     for c in range(1, len(dice))}
        self.last_validation = {"step": step_name, "iteration": iteration, "target": target, "dice": per_class,
                                "mean_dice": mean}
        self.logger.record(type="val", step=step_name, iteration=iteration,
                           global_iteration=self._global_iteration(step_name, iteration), target=target,
                           dice=per_class, mean_dice=mean, ema=ema)
        self.logger.log(f"validation ({target}, {len(self.val_cases)} cases): mean Dice {mean:.4f} "
                        f"(moving average over validations {ema:.4f}); " + ", ".join(
                            f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in per_class.items()))
        if improved:
            self.logger.log(f"checkpoint_best.pth: best moving average of the validation mean Dice so far, {ema:.4f} "
                            f"(this validation {mean:.4f})")
            save_checkpoint(checkpoint_path(self.output_folder, "best"),
                            self._state("best", self.step_names.index(step_name), iteration, None, None, None))
        dist_utils.barrier()

    def validation_dice(self, target: str) -> np.ndarray:
        """Mean hard Dice per class of the validation cases, by the real predictor on copies of the networks
        (:mod:`heartcascade.training.validation`); ``target == "net1"`` scores Net1 alone."""
        predictor = validation_predictor(self.configuration, self.plans, self.networks, self.device)
        try:
            return validation_dice(predictor, self.val_cases, target, self.plans.num_classes)
        finally:
            self.model.train()

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
