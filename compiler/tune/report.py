"""The tuning session's final report: `report.md` (tables) and `report.png` (acceptance vector,
T(n) curve against the plain step, the chosen tree drawn), written into the session folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def report_markdown(record: dict[str, Any], candidates: list[dict[str, Any]]) -> str:
    lines = [f"# Tuning report: {record['target']} with {record['draft']}", "",
             f"Device: {record['device']['cpu']} ({record['device']['cores']} cores), "
             f"{record['device']['backend']} {record['device']['backend_version']}", "",
             f"Plain step: {record['decode_ms']:.2f} ms", "",
             "| draft nodes n | verify ms T(n) | T(n) / plain step |", "|---|---|---|"]  # fmt: skip
    for nodes, ms in sorted(record["verify_ms"].items(), key=lambda item: int(item[0])):
        lines.append(f"| {nodes} | {ms:.2f} | {ms / record['decode_ms']:.2f} |")
    acceptance = record["acceptance"]
    lines += ["", f"Acceptance by draft rank: {', '.join(f'{p:.3f}' for p in acceptance['acceptance'])}; "
              f"hit rate {acceptance['hit_rate']:.3f} over {acceptance['steps']} steps; draft "
              f"{acceptance['draft_ms_per_node']:.3f} ms per node", "",
              f"Acceptance of a chain's k-th draft given the ones before (k = 1, 2, ...): "
              f"{', '.join(f'{p:.3f}' for p in record.get('chain_acceptance', []))}", "",
              "| n | depth | expected tokens/step | predicted speed-up |", "|---|---|---|---|"]  # fmt: skip
    best = sorted(candidates, key=lambda c: -c["predicted_speedup"])[:10]
    lines += [f"| {c['nodes']} | {c['depth']} | {c['expected_tokens']:.3f} | {c['predicted_speedup']:.3f}x |"
              for c in best]  # fmt: skip
    if record["mode"] == "plain":
        lines += ["", "Choice: **plain decoding** (no tree is predicted to beat it on this machine)."]
    else:
        lines += ["", f"Choice: **{len(record['parents'])} nodes, depth {record['depth']}**, parents "
                  f"{record['parents']}; predicted {record['predicted_speedup']:.2f}x, measured "
                  f"{record['measured_speedup']:.2f}x."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _tree_positions(parents: list[int]) -> dict[int, tuple[float, float]]:
    """Node -> (x, y): the root at the top, each level spread evenly."""
    depth = {-1: 0}
    for node, parent in enumerate(parents):
        depth[node] = depth[parent] + 1
    levels: dict[int, list[int]] = {}
    for node in [-1, *range(len(parents))]:
        levels.setdefault(depth[node], []).append(node)
    return {node: ((i + 1) / (len(nodes) + 1), -level)
            for level, nodes in levels.items() for i, node in enumerate(nodes)}  # fmt: skip


def report_plot(record: dict[str, Any], path: Path) -> None:
    # matplotlib is heavy and only the report draws: load it here, without a display (Agg)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display backend is tried

    figure, (ax_accept, ax_cost, ax_tree) = plt.subplots(1, 3, figsize=(15, 4.5))
    acceptance = record["acceptance"]["acceptance"]
    ax_accept.bar(range(1, len(acceptance) + 1), acceptance)
    ax_accept.set(title="acceptance by draft rank", xlabel="rank", ylabel="p(rank accepted)")
    sizes = sorted(int(n) for n in record["verify_ms"])
    ax_cost.plot(sizes, [record["verify_ms"][n] if n in record["verify_ms"] else record["verify_ms"][str(n)]
                         for n in sizes], marker="o", label="verify T(n)")  # fmt: skip
    ax_cost.axhline(record["decode_ms"], color="gray", linestyle="--", label="plain step")
    ax_cost.set(title="verify cost", xlabel="draft nodes n", ylabel="ms", xscale="log")
    ax_cost.legend()
    parents = record["parents"]
    positions = _tree_positions(parents)
    for node, parent in enumerate(parents):
        (x0, y0), (x1, y1) = positions[parent], positions[node]
        ax_tree.plot([x0, x1], [y0, y1], color="gray", linewidth=1)
    xs, ys = zip(*positions.values(), strict=True)
    ax_tree.scatter(xs, ys, s=60, zorder=3)
    title = "chosen tree" if parents else "chosen: plain decoding"
    ax_tree.set(title=f"{title} ({len(parents)} nodes)", xticks=[], ylabel="depth")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def write_report(folder: Path, record: dict[str, Any], candidates: list[dict[str, Any]]) -> Path:
    (folder / "report.md").write_text(report_markdown(record, candidates))
    report_plot(record, folder / "report.png")
    return folder / "report.md"
