"""The package's layout (docs/ARCHITECTURE.md): imports run one way, and no circle.

Every import of an lmcodec module is read from the source (those inside functions
and ``TYPE_CHECKING`` blocks too: a deferred import is still an arrow), resolved to
the module it names, and checked against the layers below.  A module may import
its own layer or any layer under it; two wings (subpackages) of one layer never
import each other; and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmcodec"

#: Lowest first.  A prefix ending in "." is a wing (every module under it).
LAYERS: list[list[str]] = [
    ["lmcodec.errors", "lmcodec.progress", "lmcodec.fileio", "lmcodec.cache"],  # leaves every layer may use
    ["lmcodec.engine.", "lmcodec.format."],                             # the exact model; the archive's bytes
    ["lmcodec.coding."],                                                # tokens ... coder, encoder, decoder
    ["lmcodec.dictionary.", "lmcodec.probe."],                          # built on the coding and the engine
    ["lmcodec.archive", "lmcodec.executors"],                           # the driver
    ["lmcodec.cluster."],                                               # an executor on Ray
    ["lmcodec.fileobj", "lmcodec.codec", "lmcodec"],                    # the public facade
    ["lmcodec.cli.", "lmcodec.__main__"],                               # the command line
]


#: A wing's own layers (sub-wings), lowest first, by the same rules: a module of the wing that
#: matches no sub-wing is at the wing's top, above all its sub-wings.
SUBLAYERS: dict[str, list[list[str]]] = {
    "lmcodec.engine.": [
        ["lmcodec.engine.spec."],                                       # constants, tables, the reference
        ["lmcodec.engine.model."],                                      # model -> integer weights
        ["lmcodec.engine.cpu.", "lmcodec.engine.triton."],              # the two kernel backends
    ],
}

#: At most this many modules at a wing's top, where it has sub-wings (the rest live in them).
MAX_TOP_MODULES = 8


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def place(module: str) -> tuple[int, str]:
    """(layer, wing) of a module: the wing is the prefix that matched."""
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix.endswith(".") and (module + ".").startswith(prefix)):
                return rank, prefix
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/ARCHITECTURE.md)")


def sub_place(module: str, wing: str) -> tuple[int, str]:
    """(rank, sub-wing) of a module within ``wing``: its top is above every sub-wing."""
    layers = SUBLAYERS.get(wing, [])
    for rank, prefixes in enumerate(layers):
        for prefix in prefixes:
            if (module + ".").startswith(prefix):
                return rank, prefix
    return len(layers), wing


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> set[str]:
    """The lmcodec modules an import statement names."""
    is_package = MODULES[importer].name == "__init__.py"
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "lmcodec"}
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "lmcodec":
        return set()
    named = {f"{target}.{a.name}" for a in node.names}
    return {m for m in named if m in MODULES} | ({target} if named - set(MODULES) else set())


def edges() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= resolve(name, node)
        graph[name] = {m for m in found if m != name}
    return graph


GRAPH = edges()


def test_every_import_names_a_module_that_exists():
    missing = {(a, b) for a, bs in GRAPH.items() for b in bs if b not in MODULES}
    assert not missing, missing


def test_imports_run_one_way():
    wrong = []
    for a, targets in GRAPH.items():
        (ra, wa) = place(a)
        for b in targets:
            (rb, wb) = place(b)
            if rb > ra or (rb == ra and wa != wb and wa.endswith(".") and wb.endswith(".")):
                wrong.append(f"{a} (layer {ra}) imports {b} (layer {rb})")
            elif wa == wb and wa in SUBLAYERS:
                (sa, swa), (sb, swb) = sub_place(a, wa), sub_place(b, wa)
                if sb > sa or (sb == sa and swa != swb and swa != wa):
                    wrong.append(f"{a} ({swa}) imports {b} ({swb}) against the grain of {wa}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_wings_with_sub_wings_keep_a_small_top():
    """A wing cut into sub-wings keeps at most MAX_TOP_MODULES modules at its top, and each
    sub-wing named in SUBLAYERS exists."""
    for wing, layers in SUBLAYERS.items():
        top = [m for m in MODULES if (m + ".").startswith(wing) and sub_place(m, wing)[1] == wing]
        assert len(top) <= MAX_TOP_MODULES, sorted(top)
        for prefixes in layers:
            for prefix in prefixes:
                assert any((m + ".").startswith(prefix) for m in MODULES), f"{prefix} has no module"


def test_the_check_sees_a_sub_wing_importing_upward():
    """The checker itself: a CPU kernel importing the engine's top, or the spec importing a
    model module, is against the grain."""
    assert sub_place("lmcodec.engine.cpu.fused", "lmcodec.engine.")[0] < \
        sub_place("lmcodec.engine.gemma", "lmcodec.engine.")[0]
    assert sub_place("lmcodec.engine.spec.reference", "lmcodec.engine.")[0] < \
        sub_place("lmcodec.engine.model.quantize", "lmcodec.engine.")[0]
    assert sub_place("lmcodec.engine.cpu.ops", "lmcodec.engine.")[0] == \
        sub_place("lmcodec.engine.triton.ops", "lmcodec.engine.")[0]


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: an engine module importing the codec is caught."""
    node = ast.parse("from ...codec import Codec").body[0]
    (target,) = resolve("lmcodec.engine.spec.constants", node)
    assert target == "lmcodec.codec" and place(target)[0] > place("lmcodec.engine.spec.constants")[0]
