"""``hc_train``: train one fold of the cascade (four-step curriculum) or of the 2 mm baseline U-Net.

Examples::

    hc_train 1 0                              # cascade, fold 0, all four steps
    hc_train Dataset001_MMWHS all             # train on every case
    hc_train 1 fold2 --steps 2,3,4            # ablation: skip step 1
    hc_train 1 0 --continue                   # resume from checkpoint_latest.pth
    hc_train 1 0 --time-budget 60m            # fit the curriculum into one hour
    hc_train 1 0 --config baseline
    hc_train 2 all --pretrained model.zip --time-budget 10m   # fine-tune a trained model on dataset 2
    torchrun --nproc_per_node 4 $(which hc_train) 1 0    # DistributedDataParallel

See documentation/training.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from heartcascade.cli.common import QUIET, HCArgumentParser, add_nnunet_flags, add_verbosity_arguments, verbosity
from heartcascade.utils.errors import HCError

#: nnU-Net's configuration names, given where hc_train expects the fold.
NNUNET_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
#: nnUNetv2_train flags with no counterpart here, and what to do instead.
NNUNET_REFUSED = {
    "--npz": "the validation predictions are label maps plus summary.json; for nnU-Net's probability files "
             "predict the validation cases with 'hc_predict --nnunet-probabilities'",
    "-num_gpus": "for several GPUs run 'torchrun --nproc_per_node N $(which hc_train) D FOLD' (see "
                 "documentation/training.md)",
    "-tr": "heartcascade has no trainer classes; the plans (hc_plan_and_preprocess --preset, hc_train "
           "--plans-override) configure training",
    "-p": "there is one plans file per preprocessed dataset; choose a preset with hc_plan_and_preprocess --preset",
    "--val": "validation runs at the end of every training (unless --no-validation); to redo it, predict the "
             "validation cases with hc_predict",
    "--val_best": "predict the validation cases with 'hc_predict -chk checkpoint_best.pth'",
    "--disable_checkpointing": "checkpoints are what --continue and hc_predict read; they cannot be turned off",
    "--use_compressed": "not needed: heartcascade reads its own preprocessed format",
}


def _configuration_in_fold_position(argv: list[str]) -> str | None:
    """nnU-Net's ``nnUNetv2_train 1 3d_fullres 0`` typed as ``hc_train 1 3d_fullres 0``."""
    given = [t for t in argv if t in NNUNET_CONFIGURATIONS]
    if not given:
        return None
    return (f"'{given[0]}' is an nnU-Net configuration; hc_train takes DATASET FOLD with no configuration "
            f"argument: 'nnUNetv2_train 1 {given[0]} 0' is 'hc_train 1 0' (the cascade; add '-c baseline' for "
            "the plain 3D U-Net)")


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(prog="hc_train", description="Train a heartcascade model (one fold). "
                         "Results go to HC_RESULTS/DatasetXXX_Name/<config>/fold_<f>/.",
                         argv_check=_configuration_in_fold_position)
    p.add_argument("dataset", help="dataset id, e.g. 1, 001 or Dataset001_MMWHS (must be preprocessed)")
    p.add_argument("fold", help="fold: 0..4 (or fold0..fold4), or 'all' to train on every case")
    p.add_argument("--config", "-c", dest="configuration", default="cascade", choices=("cascade", "baseline"),
                   help="cascade (Net1 + Net2, default) or baseline (3D U-Net at the plans' baseline spacing)")
    p.add_argument("--steps", default=None,
                   help="curriculum steps to run, comma separated (default 1,2,3,4); e.g. 2,3,4 for an ablation")
    p.add_argument("--continue", "--c", dest="continue_training", action="store_true",
                   help="resume from checkpoint_latest.pth of the fold folder (starts fresh if there is none)")
    p.add_argument("--device", "-device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained networks")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data augmentation worker processes (0 = in the main process); default: env "
                        "HC_N_PROC_DA, then the plans")
    p.add_argument("--plans-override", "--preset-override", dest="plans_override", default=None,
                   help="JSON object (or a JSON file) deep-merged into the plans, e.g. "
                        "'{\"training\": {\"steps\": [{\"step\": 1, \"epochs\": 2}]}}' (steps are "
                        "matched by number; {\"1\": {...}} works too)")
    p.add_argument("--splits", default=None,
                   help="custom splits file: JSON list of {\"train\": [...], \"val\": [...]} (default: "
                        "splits_final.json in the preprocessed folder, created as a seeded 5-fold split)")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="wall-clock budget of the training steps, e.g. 60m, 1.5h or 900s (recorded in the plans as "
                        "training.time_budget_s): the steps share it by their time_fraction and each one's "
                        "iteration count is set from its measured speed; default: the plans' time_budget_s, "
                        "else their iteration counts")
    p.add_argument("--pretrained", "-pretrained_weights", dest="pretrained", default=None, metavar="MODEL",
                   help="fine-tune: start the networks from a trained model (a model .zip, an installed model or "
                        "fold folder, a .pth checkpoint, or 'default' for the model hc_predict ships with) instead of random weights; its modality, channels, "
                        "classes and network architecture must match this dataset's plans")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the plans' training.seed)")
    p.add_argument("--no-validation", dest="predict_validation", action="store_false",
                   help="do not predict and evaluate the validation cases at the end")
    add_verbosity_arguments(p)
    add_nnunet_flags(p, refused=NNUNET_REFUSED)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from heartcascade.training.trainer import Trainer  # deferred: torch, keeps --help instant

        if args.num_workers is not None and args.num_workers < 0:
            raise HCError(f"--num-workers must be >= 0, got {args.num_workers}")
        steps = None
        if args.steps is not None:
            steps = [s for s in args.steps.replace(" ", "").split(",") if s]
        trainer = Trainer(args.dataset, args.fold, configuration=args.configuration, steps=steps,
                          continue_training=args.continue_training, device=args.device, compile=args.compile,
                          num_workers=args.num_workers, plans_override=args.plans_override,
                          splits_file=args.splits, seed=args.seed, time_budget=args.time_budget,
                          predict_validation=args.predict_validation, progress=verbosity(args) > QUIET,
                          pretrained=args.pretrained)
        result = trainer.run()
    except HCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hc_train: interrupted; resume with --continue", file=sys.stderr)
        return 130
    if trainer.dist.is_main:
        print(f"hc_train: finished {result.configuration} fold {result.fold}: {result.final_checkpoint}")
        if result.validation_summary is not None:
            print(f"hc_train: validation summary in {result.output_folder / 'validation' / 'summary.json'} "
                  f"({result.validation_method})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
