"""Write the IR to a folder, readable by people and by Graphviz.

For each step graph: `<graph>.txt` (the FX graph, one op per line, with its block) and
`<graph>.dot` (ops as nodes, clustered by block). For the block view: `blocks.txt` and
`blocks.dot`. Used by `skiptree compile --dump-ir DIR` after tracing and after every pass.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from skiptree.compiler.ir.graph import ModelIR, StepGraph


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def graph_text(step: StepGraph) -> str:
    lines = [f"# graph {step.name}", f"# inputs:  {[s.to_json() for s in step.inputs]}",
             f"# outputs: {[s.to_json() for s in step.outputs]}"]  # fmt: skip
    for node in step.graph.nodes:
        block = node.meta.get("block", "")
        lines.append(f"{node.format_node()}" + (f"    # block={block}" if block else ""))
    return "\n".join(lines) + "\n"


def graph_dot(step: StepGraph) -> str:
    clusters: dict[str, list[str]] = defaultdict(list)
    edges = []
    for node in step.graph.nodes:
        label = f"{node.name}\\n{getattr(node.target, '__name__', node.target)}"
        clusters[node.meta.get("block", node.op)].append(f"    {_quote(node.name)} [label={_quote(label)}];")
        edges += [f"  {_quote(arg.name)} -> {_quote(node.name)};" for arg in node.all_input_nodes]
    lines = [f"digraph {_quote(step.name)} {{", "  node [shape=box, fontsize=9];"]
    for index, (block, nodes) in enumerate(clusters.items()):
        lines += [f"  subgraph cluster_{index} {{", f"    label={_quote(block)};", *nodes, "  }"]
    return "\n".join(lines + edges + ["}"]) + "\n"


def blocks_text(ir: ModelIR) -> str:
    lines = []
    for name, data in ir.blocks.nodes(data=True):
        lines.append(f"{name}: kind={data['kind']} ops={len(data['ops'])} weights={data['weights']}")
    lines += [f"{a} -> {b} ({rel})" for a, b, rel in ir.blocks.edges(data="relation")]
    lines += [f"pass {r.name} options={r.options} modified={r.modified}" for r in ir.passes_run]
    return "\n".join(lines) + "\n"


def blocks_dot(ir: ModelIR) -> str:
    lines = ["digraph blocks {", "  node [shape=box];"]
    for name, data in ir.blocks.nodes(data=True):
        label = f"{name}\\n{data['kind']} ({len(data['ops'])} ops)"
        lines.append(f"  {_quote(name)} [label={_quote(label)}];")
    for a, b, rel in ir.blocks.edges(data="relation"):
        style = "dashed" if rel == "part" else "solid"
        lines.append(f"  {_quote(a)} -> {_quote(b)} [style={style}];")
    return "\n".join(lines + ["}"]) + "\n"


def dump_ir(ir: ModelIR, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, step in ir.graphs.items():
        (folder / f"{name}.txt").write_text(graph_text(step))
        (folder / f"{name}.dot").write_text(graph_dot(step))
    (folder / "blocks.txt").write_text(blocks_text(ir))
    (folder / "blocks.dot").write_text(blocks_dot(ir))
