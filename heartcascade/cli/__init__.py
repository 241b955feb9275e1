"""Console commands: one thin module per command (argument parsing only)."""

#: console command -> module in this package (``main`` is the entry point); setup.py reads this list.
COMMANDS = {
    "hc_make_synthetic": "make_synthetic",
    "hc_convert_mmwhs": "convert_mmwhs",
    "hc_import": "import_dataset",
    "hc_verify_dataset": "verify_dataset",
    "hc_plan_and_preprocess": "plan_and_preprocess",
    "hc_train": "train",
    "hc_predict": "predict",
    "hc_evaluate": "evaluate",
    "hc_determine_postprocessing": "determine_postprocessing",
    "hc_apply_postprocessing": "apply_postprocessing",
    "hc_ensemble": "ensemble",
    "hc_demo": "demo",
    "hc_benchmark": "benchmark",
    "hc_export_model": "export_model",
    "hc_install_model": "install_model",
    "hc_overlay": "overlay",
    "hc_measure": "measure",
}
