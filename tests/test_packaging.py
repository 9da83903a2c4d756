"""Packaging: our packages are the ones imported, environment.yml matches pyproject, light imports."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# pip name -> the name environment.yml uses for the same thing (conda-forge or its pip section)
CONDA_NAMES = {"torch": "pytorch", "faiss-cpu": "faiss-gpu"}


@pytest.mark.parametrize("name", ["wsi_explain", "tiling", "clustering", "viz"])
def test_package_resolves_inside_repo(name):
    mod = importlib.import_module(name)
    path = Path(mod.__file__).resolve()
    assert REPO in path.parents, f"{name} imported from {path}, not from this repository ({REPO})"
    assert isinstance(mod.__all__, list)


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].strip().lower()


def test_environment_yml_names_every_runtime_dependency():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    names = set()
    for item in env["dependencies"]:
        if isinstance(item, str):
            names.add(_req_name(item))
        elif isinstance(item, dict) and "pip" in item:
            names |= {_req_name(x) for x in item["pip"] if not x.startswith("-")}
    assert "python" in names
    missing = [d for d in map(_req_name, deps) if CONDA_NAMES.get(d, d) not in names]
    assert not missing, f"environment.yml lacks {missing}"


def test_import_tiling_stays_light():
    code = "import sys, tiling; print('torch' in sys.modules, 'openslide' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_cli_help_is_light():
    code = "import sys; from wsi_explain import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    res = subprocess.run([sys.executable, "-m", "wsi_explain.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "tile" in res.stdout


def test_readme_opens_with_two_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README has no command block"
    cmds = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert cmds == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
