"""A plain (non-editable) install ships everything the defaults load: the wheel holds the three packages and the
shipped VAE and FID feature-net weights."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ["lit_transfusion", "datamodules", "callbacks"]
# Data files loaded by default (LatentCodec.from_dir on the shipped VAE, load_feature_net's DEFAULT_PATH).
DATA_FILES = [
    "datamodules/shapes/pretrained_vae/config.json",
    "datamodules/shapes/pretrained_vae/diffusion_pytorch_model.safetensors",
    "datamodules/shapes/pretrained_features.pt",
]


def _build_wheel(tmp: Path) -> zipfile.ZipFile:
    """Build from a clean copy of the sources: setuptools writes build/ and *.egg-info next to pyproject.toml,
    and a stale build/lib in the checkout could put files into the wheel that the configuration would not."""
    src = tmp / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # --no-build-isolation: use the venv's setuptools (a dev extra), so the build needs no network.
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    wheels = list((tmp / "dist").glob("lit_transfusion-*.whl"))
    assert len(wheels) == 1, wheels
    return zipfile.ZipFile(wheels[0])


def test_wheel_ships_packages_and_default_weights(tmp_path):
    with _build_wheel(tmp_path) as wheel:
        names = set(wheel.namelist())
    missing = [f for f in DATA_FILES if f not in names]
    assert not missing, f"not in the wheel: {missing}; see [tool.setuptools.package-data] in pyproject.toml"
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names, pkg
    # every module and every weight/data file under the packages is in the wheel
    shipped = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix in {".py", ".json", ".safetensors", ".pt"}]
    missing = [p.relative_to(ROOT).as_posix() for p in shipped if p.relative_to(ROOT).as_posix() not in names]
    assert not missing, f"not in the wheel: {missing}"
    for f in DATA_FILES:
        assert (ROOT / f).is_file(), f"{f} no longer exists: update DATA_FILES"
