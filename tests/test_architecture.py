"""The architecture is machine-checked: layers import only downward, no module takes part in an
import cycle, every module imports on its own, and every registry finds its built-in entries
whatever was imported first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept(capsys):
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iteratively)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index, low, on_stack, stack, groups = {}, {}, set(), [], []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def test_no_module_is_part_of_an_import_cycle():
    graph = grimp.build_graph("sslens")
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycles(graph) == [["a.x", "a.y"]]


#: Every built-in entry of the registries users extend.
BUILT_IN = {
    "sslens.methods.base:METHODS": ["imported", "moco", "simclr", "swav"],
    "sslens.models.base:BACKBONES": ["resnet-tiny", "resnet18", "resnet18-cifar", "resnet50", "timm"],
    "sslens.data.base:DATASETS": ["cifar10", "imagefolder", "synthetic"],
    "sslens.data.augment:VIEW_RECIPES": ["eval", "moco-v2", "simclr", "swav"],
    "sslens.explain.base:EXPLAINERS": ["gradcam", "gradcam++", "perceptual", "relax", "scorecam"],
    "sslens.study.experiments:EXPERIMENTS": ["faithfulness", "quality", "sanity", "tradeoff", "tsne"],
}

#: One fresh interpreter: the heavy third-party libraries are imported once, then before each
#: check every sslens module is dropped, so each check sees sslens as a fresh interpreter does.
_FRESH = textwrap.dedent(
    """
    import importlib, json, sys
    import torch, torchvision, kornia, pytorch_grad_cam, matplotlib  # noqa: F401  (shared, slow)

    def fresh():
        for name in [m for m in sys.modules if m == "sslens" or m.startswith("sslens.")]:
            del sys.modules[name]

    failures = {}
    for module in json.loads(sys.argv[1]):
        fresh()
        try:
            importlib.import_module(module)
        except Exception as error:
            failures[module] = f"{type(error).__name__}: {error}"
    for where, names in json.loads(sys.argv[2]).items():
        fresh()
        module, attribute = where.split(":")
        registry = getattr(importlib.import_module(module), attribute)
        try:
            missing = [name for name in names if name not in registry]
        except Exception as error:
            missing = [f"{type(error).__name__}: {error}"]
        if missing:
            failures[where] = missing
    print(json.dumps(failures))
    """
)


def test_every_module_imports_alone_and_every_registry_fills_itself():
    modules = sorted(m for m in grimp.build_graph("sslens").modules if m != "sslens.__main__")
    run = subprocess.run(
        [sys.executable, "-c", _FRESH, json.dumps(modules), json.dumps(BUILT_IN)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {}
    assert len(modules) > 60


def test_the_fresh_check_reports_a_missing_registry_entry():
    """The fresh-interpreter check reports a registry whose modules do not register an entry."""
    run = subprocess.run(
        [sys.executable, "-c", _FRESH, json.dumps([]), json.dumps({"sslens.methods.base:METHODS": ["no_such_method"]})],
        capture_output=True, text=True, timeout=600,
    )
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"sslens.methods.base:METHODS": ["no_such_method"]}


def test_the_command_line_and_the_package_load_no_heavy_library():
    """``sslens --help`` answers at once: importing the CLI and the package loads neither torch
    nor matplotlib (every package ``__init__`` exports lazily)."""
    code = (
        "import sys, sslens, sslens.cli, sslens.explain, sslens.study, sslens.train, sslens.data; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'pytorch_grad_cam') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[]", run.stderr


def _api_names() -> list[str]:
    """The names docs/API.md lists, as written there: ``sslens.name`` or ``sslens.pkg.name``."""
    import re

    text = (ROOT / "docs" / "API.md").read_text()
    return sorted(set(re.findall(r"^\| `(sslens(?:\.\w+)*\.\w+)`", text, flags=re.M)))


def test_every_name_in_the_api_page_imports():
    import importlib

    names = _api_names()
    assert len(names) > 30
    for dotted in names:
        module, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), name), dotted


@pytest.mark.parametrize("name", ["__version__", "load_model", "create_explainer", "RELAX", "run_study"])
def test_the_package_exports_the_common_entry_points(name):
    import sslens

    assert name in sslens.__all__ and getattr(sslens, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        sslens.no_such_name  # noqa: B018
