#!/usr/bin/env python
"""nnU-Net v2 trained for a fixed wall-clock budget on a heartcascade raw dataset, then used to predict.

The peer of ``hc_train --time-budget``: same raw dataset (a heartcascade raw dataset is an nnU-Net v2
raw dataset), same train/validation split, the same CPU wall time. Runs in a separate virtual environment
that has ``nnunetv2`` (``pip install nnunetv2 torch==2.13.0`` in one command, see
shared/notes/nnunet-as-a-peer.md); imports nothing from heartcascade.

nnU-Net's own command-line trainer looks trainers up by name, which imports torchvision (broken beside
CPU torch), so its default trainer is built here in Python, as the note advises. The budget: after each
epoch the number of epochs is set to what fits in the remaining time at the measured epoch duration, and
nnU-Net's poly learning-rate schedule is stretched to that count, so its decay ends on time as it would
in a full run. Epochs are short (``--iterations-per-epoch``, default 25) so the estimate is refreshed
often; nnU-Net's online validation uses 3 batches per epoch.

Usage (in the nnU-Net venv)::

    python scripts/nnunet_peer_train.py --raw WORK/raw --preprocessed WORK/nnunet_pre --results WORK/nnunet_res \\
        -d 20 -c 2d --split WORK/splits_heldout.json --budget-minutes 15 \\
        --predict-input WORK/test/images --predict-output WORK/predictions/nnunet_2d

Prints one JSON line with the figures (epochs, iterations, seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--raw", type=Path, required=True, help="folder holding DatasetXXX_Name (heartcascade HC_RAW)")
    p.add_argument("--preprocessed", type=Path, required=True, help="nnU-Net's preprocessed folder (created)")
    p.add_argument("--results", type=Path, required=True, help="nnU-Net's results folder (created)")
    p.add_argument("-d", "--dataset", type=int, required=True)
    p.add_argument("-c", "--configuration", default="2d", help="2d or 3d_fullres")
    p.add_argument("--split", type=Path, required=True, help='JSON list with one {"train": [...], "val": [...]}')
    p.add_argument("--budget-minutes", type=float, default=15.0, help="training wall time (whole run_training)")
    p.add_argument("--iterations-per-epoch", type=int, default=25)
    p.add_argument("--predict-input", type=Path, default=None, help="folder of *_0000.nii.gz images to predict")
    p.add_argument("--predict-output", type=Path, default=None)
    args = p.parse_args()

    for var, path in (("nnUNet_raw", args.raw), ("nnUNet_preprocessed", args.preprocessed),
                      ("nnUNet_results", args.results)):
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path.resolve())
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    import torch

    torch.set_num_threads(2)
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(args.dataset)
    pre = args.preprocessed / name
    figures: dict = {"dataset": name, "configuration": args.configuration, "budget_s": args.budget_minutes * 60}
    t = time.perf_counter()
    if not (pre / "nnUNetPlans.json").is_file() or not any(pre.glob(f"nnUNetPlans_{args.configuration}*")):
        subprocess.check_call([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d",
                               str(args.dataset), "-c", args.configuration, "-np", "1", "--verify_dataset_integrity"])
    figures["plan_and_preprocess_s"] = round(time.perf_counter() - t, 1)
    split = json.loads(args.split.read_text())
    save_json(split[:1], str(pre / "splits_final.json"))

    budget_s = args.budget_minutes * 60.0
    ipe = args.iterations_per_epoch

    class BudgetTrainer(nnUNetTrainer):
        """nnU-Net's default trainer with short epochs and an epoch count fitted to a wall-clock budget."""

        # nnU-Net records its constructor's arguments by name, so the signature is spelled out
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = ipe
            self.num_val_iterations_per_epoch = 3
            self.num_epochs = 1000

        def fit_epochs(self, started: float) -> None:
            elapsed = time.perf_counter() - started
            per_epoch = elapsed / max(1, self.current_epoch)
            fits = self.current_epoch + int(max(0.0, budget_s - elapsed) // per_epoch)
            self.num_epochs = max(self.current_epoch, min(1000, fits))
            self.lr_scheduler.max_steps = max(self.num_epochs, 1)

        def run_budgeted(self) -> None:
            self.on_train_start()
            started = time.perf_counter()
            while self.current_epoch < self.num_epochs:
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()  # current_epoch += 1
                self.fit_epochs(started)
            self.on_train_end()

    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnU-Net's own launcher adds to the plans (nnunetv2 2.8)
    dataset_json = load_json(str(pre / "dataset.json"))
    trainer = BudgetTrainer(plans=plans, configuration=args.configuration, fold=0, dataset_json=dataset_json,
                            device=torch.device("cpu"))
    t = time.perf_counter()
    trainer.run_budgeted()
    figures.update(train_s=round(time.perf_counter() - t, 1), epochs=trainer.current_epoch,
                   iterations=trainer.current_epoch * ipe, batch_size=trainer.batch_size,
                   patch_size=list(trainer.configuration_manager.patch_size), model_folder=trainer.output_folder)

    if args.predict_input is not None and args.predict_output is not None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        t = time.perf_counter()
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                    allow_tqdm=False)
        # the trained network as it is (loading the folder would look the trainer class up by name, which
        # imports torchvision); the final weights, as in checkpoint_final.pth
        trainer.set_deep_supervision_enabled(False)  # one output, as nnU-Net does for its own validation
        trainer.network.eval()
        network = trainer.network
        predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                        [network.state_dict()], trainer.dataset_json, "nnUNetTrainer",
                                        trainer.inference_allowed_mirroring_axes)
        predictor.predict_from_files(str(args.predict_input), str(args.predict_output), save_probabilities=False,
                                     overwrite=True, num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)
        figures["predict_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
