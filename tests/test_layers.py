"""The package's layers, read from the source (ast): no module imports a module of a higher layer,
the package has no import cycle, and every module has a layer. An import counts wherever it is
written -- at module level, inside a function, under `if TYPE_CHECKING:` -- and so does
importlib.import_module("spon...") with a literal name.

Layers, lowest first:
    0 core       the method: torch + transformers (kernels loaded when used)
    1 sources    what a model string names, and fetching/dequantizing named and GGUF models
    2 chain      spon.stages (the method's stages as functions of files), the evaluation suite
    3 pipeline   Prefect tasks and flows, the run time (store, tracking, cache)
    4 commands   the command lines

A new module fails test_every_module_has_a_layer until it is given one in LAYERS.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CORE, SOURCES, CHAIN, PIPELINE, COMMANDS = range(5)
NAMES = {CORE: "core", SOURCES: "sources", CHAIN: "chain", PIPELINE: "pipeline", COMMANDS: "command lines"}
# Exact module names. PREFIXES: a package and everything under it (an exact name wins).
LAYERS = {
    # `spon` itself (spon/__init__.py) is the public facade over the core and the sources
    # (spon.load_model): a core module imports from the module that defines a name, never from it.
    "spon": SOURCES,
    **dict.fromkeys(["spon.errors", "spon.format", "spon.digest", "spon.assets", "spon.model", "spon.sparse",
                     "spon.calibration", "spon.thresholds", "spon.distill", "spon.fuse", "spon.oneshot",
                     "spon.perplexity", "spon.config", "spon.presets", "spon.quantize", "spon.distributed",
                     "spon.kernel_backend", "spon.checks", "spon.console", "spon.lock", "spon.corpora"], CORE),
    **dict.fromkeys(["spon.sources", "spon.gguf", "spon.models"], SOURCES),
    "spon.stages": CHAIN,
    **dict.fromkeys(["spon.cli", "spon.cli_args", "spon.method_cli", "spon.flows.cli", "spon.evaluation.cli"], COMMANDS),
}
PREFIXES = {"spon.remote_code": CORE, "spon.kernels": CORE, "spon.evaluation": CHAIN,
            "spon.runtime": PIPELINE, "spon.tasks": PIPELINE, "spon.flows": PIPELINE}
# Third-party packages only the pipeline may use (prefect, mlflow, the store's S3 client, Dask).
PIPELINE_DEPS = ("prefect", "prefect_dask", "mlflow", "boto3", "botocore", "dask", "distributed")
# The method's command lines (spon.method_cli, spon.cli_args) are command-line layer, yet must run
# without the pipeline installed: they import none of it, not even inside a function.
METHOD_COMMANDS = ("spon.method_cli", "spon.cli_args")
PIPELINE_PACKAGES = ("spon.runtime", "spon.tasks", "spon.flows")


def layer_of(module: str) -> int | None:
    if module in LAYERS:
        return LAYERS[module]
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return PREFIXES[prefix]
    return None


def package_modules() -> dict[str, Path]:
    """Every module of the installed package tree: pyproject.toml's packages and package-dir."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]
    out = {}
    for pkg in tool["packages"]:
        parent = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len)
        folder = REPO / dirs[parent] / Path(*pkg[len(parent):].lstrip(".").split(".") if pkg != parent else ())
        for f in sorted(folder.glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def imports_of(source: str, module: str, is_package: bool = False, modules=None) -> set[str]:
    """Every module name `source` imports, anywhere in it (relative imports made absolute).
    `from pkg import name` counts pkg.name when that is one of `modules` (a submodule), else pkg;
    with no `modules`, both."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            subs = {f"{base}.{a.name}" for a in node.names if a.name != "*"}
            found |= subs if modules is None else subs & set(modules)
            if modules is None or not subs or any(s not in modules for s in subs):
                found.add(base)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            found.add(node.args[0].value)
    return found


def graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (third-party names dropped)."""
    mods = package_modules()
    edges = {}
    for name, path in mods.items():
        edges[name] = {m for m in imports_of(path.read_text(), name, path.stem == "__init__", mods) if m in mods} - {name}
    return edges


def all_imports() -> dict[str, set[str]]:
    return {name: imports_of(path.read_text(), name, path.stem == "__init__") for name, path in package_modules().items()}


def test_the_tree_is_found():
    mods = package_modules()
    assert {"spon", "spon.model", "spon.sources", "spon.kernels", "spon.runtime.store", "spon.tasks.fetch",
            "spon.flows.cli", "spon.evaluation.suite", "spon.remote_code"} <= set(mods)
    assert all(p.is_file() for p in mods.values())


def test_every_module_has_a_layer():
    missing = sorted(m for m in package_modules() if layer_of(m) is None)
    assert not missing, f"modules with no layer (add them to LAYERS in {Path(__file__).name}): {missing}"


def test_no_module_imports_a_higher_layer():
    bad = []
    for mod, targets in graph().items():
        for t in sorted(targets):
            lm, lt = layer_of(mod), layer_of(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{mod} ({NAMES[lm]}) imports {t} ({NAMES[lt]})")
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_no_import_cycle():
    edges = graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan: every strongly connected component of more than one module is a cycle
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles (each list: modules that import each other, directly or not):\n" + \
        "\n".join(", ".join(c) for c in cycles)


def test_below_the_pipeline_no_pipeline_dependency():
    bad = [f"{m} imports {t}" for m, ts in all_imports().items() if layer_of(m) is not None and layer_of(m) < PIPELINE
           for t in sorted(ts) if t.split(".")[0] in PIPELINE_DEPS]
    assert not bad, "\n".join(bad)


def test_the_method_command_line_does_not_import_the_pipeline():
    imports = all_imports()
    bad = [f"{m} imports {t}" for m in METHOD_COMMANDS for t in sorted(imports[m])
           if t.split(".")[0] in PIPELINE_DEPS or t.startswith(PIPELINE_PACKAGES) or t == "spon.cli"]
    assert not bad, "\n".join(bad)


def module_level_imports(module: str) -> set[str]:
    """What `module` imports when it is imported: its top-level statements (an `if`/`try` block
    at top level included), not function or class bodies."""
    path = package_modules()[module]
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def top(nodes):
        for n in nodes:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                found.update(imports_of(ast.unparse(n), module, path.stem == "__init__"))
            elif isinstance(n, (ast.If, ast.Try)):
                top(n.body + n.orelse + getattr(n, "finalbody", []) + [x for h in getattr(n, "handlers", []) for x in h.body])

    top(tree.body)
    return found


def test_checks_and_sources_load_no_model_library_on_import():
    """spon.checks (every command's first checks) and spon.sources import neither torch nor
    transformers when imported: a refused command never pays for them."""
    for module in ("spon.checks", "spon.sources"):
        heavy = sorted(t for t in module_level_imports(module) if t.split(".")[0] in ("torch", "transformers"))
        assert not heavy, f"{module} imports {heavy} at module level"
    assert not any(t.split(".")[0] == "transformers" for t in all_imports()["spon.checks"])


def test_the_collector_sees_function_level_and_relative_imports():
    src = ("import spon.errors\n"
           "def f():\n    from spon.runtime import store\n"
           "class C:\n    def g(self):\n        from . import sibling\n        from .. import errors\n"
           "def h():\n    import importlib\n    return importlib.import_module('spon.tasks.fetch')\n")
    got = imports_of(src, "spon.evaluation.x")
    assert {"spon.errors", "spon.runtime", "spon.runtime.store", "spon.evaluation.sibling", "spon.errors",
            "spon.tasks.fetch"} <= got
    # and such an import in a core module is refused by the layer rule
    assert layer_of("spon.runtime.store") > layer_of("spon.model")


def test_import_spon_registers_no_op_and_probes_no_triton():
    """The kernels are loaded when used: `import spon` (the method, and the one mask definition in
    spon.kernels.reference) neither imports triton nor registers the custom op nor builds the
    native extension."""
    code = ("import spon, sys; "
            "bad = sorted(m for m in sys.modules if m == 'triton' or m.startswith(('spon.kernels.ops', "
            "'spon.kernels.triton', 'spon.kernels.cpu_native', 'spon.kernel_backend'))); "
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr.strip().splitlines()[-1]
