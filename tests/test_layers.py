"""The package's import graph: no cycles, and no layer imports one above it.

Read from the source with ``ast`` (every ``import`` statement, module-level and inside
functions), so a lazy import cannot hide a cycle or an upward dependency.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxalign"

# A known lazy cycle, kept on purpose: grading off the main thread (where signals cannot
# interrupt it) is sent to the worker pool, whose workers run the grader.
ALLOWED_CYCLES = [{"jaxalign.verify.grader", "jaxalign.verify.pool", "jaxalign.verify.rewards"}]

# (importing modules, modules they must not import): each layer sees only those below it.
FORBIDDEN = [
    (("jaxalign.verify",), ("jaxalign.",)),  # the verifier never imports jax-land code
    (("jaxalign.data",), ("jaxalign.models", "jaxalign.rollout", "jaxalign.algorithms",
                          "jaxalign.trainer", "jaxalign.rundir", "jaxalign.checkpoint",
                          "jaxalign.train")),
    (("jaxalign.models",), ("jaxalign.rollout", "jaxalign.algorithms", "jaxalign.trainer",
                            "jaxalign.rundir", "jaxalign.checkpoint", "jaxalign.train")),
    (("jaxalign.rollout",), ("jaxalign.algorithms", "jaxalign.trainer", "jaxalign.rundir",
                             "jaxalign.checkpoint", "jaxalign.train")),
    # the client speaks the wire format (rollout.wire), never the server's code
    (("jaxalign.rollout.client",), ("jaxalign.rollout.server",)),
    (("jaxalign.checkpoint", "jaxalign.rundir", "jaxalign.storage", "jaxalign.config",
      "jaxalign.evaluation", "jaxalign.trainer", "jaxalign.losses", "jaxalign.optim",
      "jaxalign.sharding", "jaxalign.logging", "jaxalign.distributed"),
     ("jaxalign.algorithms", "jaxalign.train")),
]


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """``{module: the jaxalign modules it imports}`` (``from pkg import submodule`` counts as
    the submodule; importing a package's name counts as the package)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                           else node.module for a in node.names]
            else:
                continue
            for target in targets:
                resolved = resolve(target) if target.startswith("jaxalign") else None
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    found = [c for c in cycles(import_graph()) if c not in ALLOWED_CYCLES]
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(p.endswith(".") and name.startswith(p) or name == p or name.startswith(p + ".")
               for p in prefixes)


def test_no_layer_imports_one_above_it():
    graph = import_graph()
    bad = []
    for importers, forbidden in FORBIDDEN:
        for module, targets in graph.items():
            if not _within(module, importers):
                continue
            for target in targets:
                # A rule about whole packages leaves a package's own modules alone; one
                # naming a module (jaxalign.rollout.server) holds inside its package too.
                same_package = (target.split(".")[:2] == module.split(".")[:2]
                                and all(f.count(".") < 2 for f in forbidden))
                if _within(target, forbidden) and not same_package:
                    bad.append(f"{module} imports {target}")
    assert not bad, bad
