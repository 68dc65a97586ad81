"""The import graph: no cycle among multitune's modules (import-linter's layers contract checks the layers,
this checks every module, inside a layer too)."""

from __future__ import annotations

import grimp


def test_no_import_cycles():
    graph = grimp.build_graph("multitune", exclude_type_checking_imports=True)
    cycles = set()
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.add(" -> ".join((module, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))
