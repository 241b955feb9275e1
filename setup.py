"""heartcascade: self-configuring cascaded whole-heart segmentation of 3D cardiac CT and MR."""
import ast
from pathlib import Path

from setuptools import find_packages, setup


def _commands() -> dict[str, str]:
    """Console command -> module in heartcascade/cli, read from heartcascade/cli/__init__.py (the one list;
    read as text so that building never imports the package)."""
    tree = ast.parse((Path(__file__).parent / "heartcascade" / "cli" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMMANDS":
            return ast.literal_eval(node.value)
    raise RuntimeError("heartcascade/cli/__init__.py defines no COMMANDS")


COMMANDS = _commands()

setup(
    name="heartcascade",
    version="0.1.0",
    description="Cascaded full-resolution whole-heart segmentation (Net1 coarse U-Net + Net2 slice network)",
    # The planner presets live in the top-level plans/ folder (the documented, editable copy) and ship
    # inside the wheel as the data-only package heartcascade.presets (see planning/presets.py).
    packages=find_packages(include=["heartcascade", "heartcascade.*"]) + ["heartcascade.presets"],
    package_dir={"heartcascade.presets": "plans"},
    package_data={"heartcascade.presets": ["*.json"]},
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
        "highdicom>=0.28.2",
    ],
    extras_require={"test": ["pytest>=7"], "nnunet": ["nnunetv2"]},
    entry_points={"console_scripts": [f"{cmd}=heartcascade.cli.{mod}:main" for cmd, mod in COMMANDS.items()]},
)
