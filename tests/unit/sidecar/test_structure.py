"""Structure bars of the sidecar package (DESIGN §16): no import cycle between its modules —
counting every import, at module level, inside functions or under TYPE_CHECKING — no module
over 400 lines and no function over 60 lines (the generated ``sidecar/api/v1`` stubs aside)."""

from __future__ import annotations

from tests.unit._structure import find_cycle, import_graph, modules, oversized


def test_no_import_cycle_inside_sidecar() -> None:
    graph = import_graph(modules("sidecar"))
    assert graph["sidecar.jobs._runner"] >= {"sidecar.jobs._kind", "sidecar._observer"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_modules_and_functions_are_small() -> None:
    too_big = oversized(modules("sidecar"))
    assert not too_big, "\n".join(too_big.values())
