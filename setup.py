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
HERE = Path(__file__).parent
#: The project's public home page; empty until it is published (then it becomes Home-page / Project-URL).
HOMEPAGE = ""

setup(
    name="heartcascade",
    version="0.1.0",
    description="Cascaded full-resolution whole-heart segmentation (Net1 coarse U-Net + Net2 slice network)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    **({"url": HOMEPAGE} if HOMEPAGE else {}),
    project_urls={
        **({"Source": HOMEPAGE, "Documentation": f"{HOMEPAGE}/tree/main/documentation"} if HOMEPAGE else {}),
        "nnU-Net (dataset format it reads)": "https://github.com/MIC-DKFZ/nnUNet",
    },
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Healthcare Industry",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Image Processing",
    ],
    # The planner presets live in the top-level plans/ folder (the documented, editable copy) and ship
    # inside the wheel as the data-only package heartcascade.presets (see planning/presets.py).
    packages=find_packages(include=["heartcascade", "heartcascade.*"]) + ["heartcascade.presets"],
    package_dir={"heartcascade.presets": "plans"},
    # heartcascade/pretrained/ holds the shipped model (a hc_export_model zip) and its card (data only).
    package_data={"heartcascade.presets": ["*.json"], "heartcascade": ["pretrained/*.zip", "pretrained/*.json",
                                                                       "pretrained/*.md"]},
    python_requires=">=3.10",
    # torch is pinned by the Makefile (torch==2.13.0 installed first); here any 2.x already present will do.
    # constraints.txt holds the versions tested together (pip install -c constraints.txt .).
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
