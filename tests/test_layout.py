"""The package map (docs/package-map.md) is true: every module it lists exists, every module of ganflow/ is listed,
imports follow its layers, the posterior takes nothing of stage one but its package API, and the built-in problems
use only ganflow's public names."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP = os.path.join(ROOT, "docs", "package-map.md")


def _listed() -> dict[str, int]:
    rows = re.findall(r"^\| `(ganflow/[\w/]+\.py)` \| (\d) \|", open(MAP, encoding="utf-8").read(), re.M)
    return {path: int(layer) for path, layer in rows}


def _modules(top: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
        out += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files if f.endswith(".py")]
    return sorted(out)


def _dotted(path: str) -> str:
    mod = path[:-3].replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def _imports(path: str, source: str | None = None) -> set[str]:
    """The ganflow modules ``path`` imports (relative imports resolved; ``from pkg import mod`` names the module);
    ``source`` stands in for the file's text."""
    mod = _dotted(path)
    pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    source = open(os.path.join(ROOT, path), encoding="utf-8").read() if source is None else source
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                known = os.path.exists(os.path.join(ROOT, sub.replace(".", "/") + ".py")) or os.path.isdir(
                    os.path.join(ROOT, sub.replace(".", "/")))
                out.add(sub if known else target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.split(".")[0] == "ganflow"}


def _layer_of(module: str, layers: dict[str, int]) -> int | None:
    for cand in (module.replace(".", "/") + ".py", module.replace(".", "/") + "/__init__.py"):
        if cand in layers:
            return layers[cand]
    return None


def test_the_map_lists_every_module_and_only_modules_that_exist():
    listed = set(_listed())
    present = set(_modules("ganflow"))
    assert not present - listed, f"modules missing from docs/package-map.md: {sorted(present - listed)}"
    assert not listed - present, f"docs/package-map.md lists modules that do not exist: {sorted(listed - present)}"


def test_imports_never_point_up_the_layers():
    layers = _listed()
    bad = []
    for path, layer in layers.items():
        for target in _imports(path):
            if target == "ganflow" and path != "ganflow/__init__.py":
                continue  # `from . import __version__`: the package's version string, not its API
            t = _layer_of(target, layers)
            if t is not None and t > layer:
                bad.append(f"{path} (layer {layer}) imports {target} (layer {t})")
    assert not bad, "\n".join(bad)


def test_the_posterior_takes_only_the_prior_package_api():
    bad = [f"{p} imports {t}" for p in _modules("ganflow/posterior") for t in _imports(p)
           if t.startswith("ganflow.prior.")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", _modules("problems"))
def test_built_in_problems_use_only_the_public_api(path):
    """``from ganflow import X`` (X public: in ``ganflow.__all__``) and the problems' own package, nothing else."""
    import ganflow

    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "ganflow":
            if node.module == "ganflow":
                assert all(a.name in ganflow.__all__ for a in node.names), (path, [a.name for a in node.names])
            else:
                assert node.module.startswith("ganflow.problems"), (path, node.module)
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] != "ganflow" for a in node.names), path


def test_a_wrong_import_is_caught():
    """The checks can fail: a layer-0 module importing the CLI, stage one importing the posterior."""
    layers = _listed()
    up = _imports("ganflow/errors.py", "from .cli import main\n")
    assert up == {"ganflow.cli"} and _layer_of("ganflow.cli", layers) > layers["ganflow/errors.py"]
    assert _imports("ganflow/prior/nets.py", "from ..posterior import flow\n") == {"ganflow.posterior.flow"}
    assert _imports("ganflow/posterior/smc.py", "from ..prior.checkpoint import x\n") == {"ganflow.prior.checkpoint"}
