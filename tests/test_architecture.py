"""The package's import structure: layers import only downwards, no two modules import each
other (directly or round a longer cycle), and the core never imports the integrations' heavy
dependencies. Every import counts, module-level or inside a function (a lazy import is still
a dependency). The layers are README's layout table."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "pear_kernels"

# README's layout table, bottom first
LAYERS = [
    ("foundation", ["pear_kernels.config", "pear_kernels.importance", "pear_kernels.checks"]),
    ("kernels", ["pear_kernels.kernels"]),
    ("ops", ["pear_kernels.ops"]),
    ("api", ["pear_kernels.loss", "pear_kernels.logprobs", "pear_kernels.distill", "pear_kernels.reference",
             "pear_kernels.inputs", "pear_kernels.distributed", "pear_kernels.stats", "pear_kernels.compiled",
             "pear_kernels"]),  # the package __init__ re-exports the API
    ("integrations", ["pear_kernels.transformers", "pear_kernels.rl", "pear_kernels.cli"]),
]
CORE_LAYERS = {"foundation", "kernels", "ops", "api"}
# what the core may never import, lazily or not
FORBIDDEN_IN_CORE = ("transformers", "trl", "datasets", "accelerate", "peft", "liger_kernel", "pear_kernels.rl",
                     "pear_kernels.transformers", "pear_kernels.cli")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """(imported module, line) for every import in the file, relative ones resolved; for
    ``from package import name`` the submodule package.name when it is one."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                if _is_module(sub):
                    out.append((sub, node.lineno))
                else:
                    out.append((target, node.lineno))
    return out


def _is_module(name: str) -> bool:
    if not name.startswith("pear_kernels"):
        return False
    rel = pathlib.Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").exists() or (PKG / rel / "__init__.py").exists()


def _graph():
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        graph[_module_name(path)] = _imports(path)
    return graph


def _layer(mod: str):
    best = None
    for rank, (name, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if mod == p or mod.startswith(p + ".") and p != "pear_kernels":
                if best is None or len(p) > best[2]:
                    best = (rank, name, len(p))
    return None if best is None else best[:2]


def test_every_module_has_a_layer():
    missing = [m for m in _graph() if _layer(m) is None]
    assert not missing, f"modules outside README's layout table: {missing}"


def test_no_upward_import():
    bad = []
    for mod, imports in _graph().items():
        rank, name = _layer(mod)
        for target, line in imports:
            if not target.startswith("pear_kernels"):
                continue
            t = _layer(target)
            if t is not None and t[0] > rank:
                bad.append(f"{mod}:{line} ({name}) imports {target} ({t[1]})")
    assert not bad, "imports that run up a layer:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _ in imps if t in _graph_nodes()} - {m} for m, imps in _graph().items()}
    # a package __init__ importing its own submodules is how Python packages work, not a cycle
    # of the code; every other edge counts
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t.startswith(m + ".") and _is_package(m))}
        graph[m] = {t for t in graph[m] if not (m.startswith(t + ".") and _is_package(t))}
    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _graph_nodes():
    return {_module_name(p) for p in PKG.rglob("*.py")}


def _is_package(name: str) -> bool:
    return (PKG / pathlib.Path(*name.split(".")[1:]) / "__init__.py").exists()


def test_core_never_imports_the_integrations_dependencies():
    bad = []
    for mod, imports in _graph().items():
        if _layer(mod)[1] not in CORE_LAYERS:
            continue
        for target, line in imports:
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN_IN_CORE):
                bad.append(f"{mod}:{line} imports {target}")
    assert not bad, "the core imports an integration dependency:\n" + "\n".join(bad)


@pytest.mark.parametrize("backend", ["torch_chunked", "native_cpu", "triton_pear"])
def test_backends_answer_the_backend_protocol(backend):
    """Each backend module defines the three calls of kernels.backend.Backend with its
    parameters (names and order; extra keyword-only knobs allowed after them)."""
    import inspect

    from pear_kernels.kernels.backend import Backend

    path = PKG / "kernels" / f"{backend}.py"
    tree = ast.parse(path.read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name in ("forward", "backward", "token_logprobs"):
        assert name in funcs, f"{backend} lacks {name}"
        want = [p for p in inspect.signature(getattr(Backend, name)).parameters if p != "self"]
        args = funcs[name].args
        got = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        assert [g for g in got if g in want] == want, f"{backend}.{name}{got} vs Backend.{name}{want}"


def test_the_checker_sees_a_planted_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a copy of two modules that import each other and a kernel
    importing the API are found."""
    fake = tmp_path / "pear_kernels"
    (fake / "kernels").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "config.py").write_text("from . import importance\n")
    (fake / "importance.py").write_text("from .config import X\n")
    (fake / "loss.py").write_text("")
    (fake / "kernels" / "__init__.py").write_text("")
    (fake / "kernels" / "k.py").write_text("from ..loss import f\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PKG"]), "PKG", fake)
    with pytest.raises(AssertionError, match="config -> pear_kernels.importance -> pear_kernels.config"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="kernels.k:1 .kernels. imports pear_kernels.loss .api."):
        test_no_upward_import()
