"""Packaging facts that drift silently: dependencies, versions, the ComfyUI pin, the entrypoint."""

import re

import tomllib

from comfyui_shield.version import __version__
from harness.host import REPO_ROOT


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def requirement_lines(path) -> list[str]:
    lines = (REPO_ROOT / path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def pins() -> dict:
    pairs = re.findall(r"^([A-Z_]+)=(\S+)", (REPO_ROOT / "scripts" / "pins.env").read_text(), re.M)
    return dict(pairs)


def test_requirements_match_pyproject_dependencies():
    assert requirement_lines("requirements.txt") == pyproject()["project"]["dependencies"]


def test_versions_agree():
    assert pyproject()["project"]["version"] == __version__


def test_requires_comfyui_is_the_tested_version():
    assert pyproject()["tool"]["comfy"]["requires-comfyui"] == f">={pins()['COMFYUI_VERSION']}"


def test_registry_lint_rules_are_on():
    selected = pyproject()["tool"]["ruff"]["lint"]["select"]
    assert {"S102", "S307"} <= set(selected)


def test_init_defines_only_the_v3_entrypoint():
    source = (REPO_ROOT / "__init__.py").read_text()
    assert "comfy_entrypoint" in source
    assert "NODE_CLASS_MAPPINGS" not in source.replace('"NODE_CLASS_MAPPINGS"', "")
