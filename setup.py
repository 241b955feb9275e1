"""heartcascade: self-configuring cascaded whole-heart segmentation of 3D cardiac CT and MR."""
from setuptools import find_packages, setup

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
    "hc_demo": "demo",
    "hc_benchmark": "benchmark",
}

setup(
    name="heartcascade",
    version="0.1.0",
    description="Cascaded full-resolution whole-heart segmentation (Net1 coarse U-Net + Net2 slice network)",
    packages=find_packages(include=["heartcascade", "heartcascade.*"]),
    python_requires=">=3.10",
    # torch is pinned by the Makefile (torch==2.13.0 installed first); here any 2.x already present will do.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "SimpleITK>=2.3",
        "batchgenerators>=0.25",
        "acvl-utils>=0.2",
        "connected-components-3d>=3.0",
        "scipy>=1.10",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={"test": ["pytest>=7"], "nnunet": ["nnunetv2"]},
    entry_points={"console_scripts": [f"{cmd}=heartcascade.cli.{mod}:main" for cmd, mod in COMMANDS.items()]},
)
