"""kdcache installs as one package with a console script; the checkout's entry points are the same command."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT, cli_env


def test_wheel_holds_one_package_and_the_console_script(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "kdcache", src / "kdcache", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("kdcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"kdcache"}, top  # no generic top-level names (pipeline, stages, cli) on sys.path
    for module in ("kdcache/cli.py", "kdcache/cache/store.py", "kdcache/methods/customkd.py", "kdcache/stages/distill.py",
                   "kdcache/train/session.py", "kdcache/extract/work.py"):
        assert module in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[console_scripts]" in text and "kdcache = kdcache.cli:run" in text


def test_python_m_kdcache_and_cli_py_are_the_same_command():
    outs = []
    for args in (["-m", "kdcache", "--help"], [str(ROOT / "cli.py"), "--help"]):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    for out in outs:
        assert "extract" in out and "distill" in out and "evaluate" in out
    proc = subprocess.run([sys.executable, "-c", "import kdcache, kdcache.stages.distill; print(kdcache.__version__)"],
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


# which top-level parts of kdcache each part may import (a part never imports one above it)
LAYERS = {"cache": {"cache", "codes"}, "options": {"options", "cache"}, "registry": {"registry", "options"},
          "library": {"library", "cache", "codes", "options", "registry"},
          "methods": {"methods", "library", "cache", "codes", "options", "registry"},
          "extract": {"extract", "library", "methods", "cache", "codes", "options", "registry"},
          "train": {"train", "library", "methods", "cache", "codes", "options", "registry"},
          "stages": {"stages", "extract", "train", "library", "methods", "cache", "codes", "options", "registry"},
          "cli": {"cli", "stages", "library", "methods", "cache", "codes", "options", "registry", "extract", "train"}}


def _part(module: str) -> str:
    first = module.split(".")[1] if module.startswith("kdcache.") else module
    return first if first in LAYERS or first == "codes" else "library"


def test_imports_point_down_and_no_function_class_or_stage_driver_outgrows_its_limit():
    """Every import inside kdcache goes to its own part or a part below it (cache < options < registry <
    library < methods < extract, train < stages < cli); no function is over 80 lines, no class over 250,
    no stage driver over 150."""
    import ast

    root = Path(__file__).resolve().parents[1] / "kdcache"
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module == "kdcache" or module == "kdcache.__main__":
            continue
        part = _part(module)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (rel.name == "__init__")]
                targets = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:
                    targets = [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    assert node.end_lineno - node.lineno < 80, (module, node.name)
                if isinstance(node, ast.ClassDef):
                    assert node.end_lineno - node.lineno < 250, (module, node.name)
                continue
            for target in targets:
                if target.startswith("kdcache.") and target not in ("kdcache.__version__",):
                    other = _part(target)
                    allowed = LAYERS.get(part, LAYERS["library"]) | {"codes"}
                    assert other in allowed or target == "kdcache", (module, target)
        if part == "stages" and path.stem in ("extract", "distill", "evaluate", "demo"):
            assert len(path.read_text().splitlines()) < 150, path
