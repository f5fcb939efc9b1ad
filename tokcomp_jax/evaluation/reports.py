"""Reports of a sweep's records: a markdown table and a PNG of four plots (accuracy against the
compression ratio per press, cache memory against context length, prefill and decode tokens/s)."""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from tokcomp_jax.presses.registry import NO_PRESS

MIB = 2 ** 20


def _groups(records: Iterable[dict], *fields: str) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for record in records:
        groups[tuple(record[f] for f in fields)].append(record)
    return dict(groups)


def _quality(records: Sequence[dict]) -> float:
    """Accuracy in % (string match), or perplexity over all tokens for the perplexity task."""
    if "nll" in records[0]:
        return float(np.exp(sum(r["nll"] * r["scored_tokens"] for r in records) /
                            sum(r["scored_tokens"] for r in records)))
    return 100.0 * float(np.mean([r["score"] for r in records]))


def metric(records: Sequence[dict]) -> str:
    return "perplexity" if "nll" in records[0] else "accuracy (%)"


def _rate(records: Sequence[dict], tokens: Callable[[dict], int], seconds: str) -> float:
    """Tokens per second over the records (total tokens over total seconds)."""
    total = sum(r[seconds] for r in records)
    return sum(map(tokens, records)) / total if total > 0 else float("nan")


def wall_seconds(record: dict) -> float:
    """A case's share of its batch's wall time (records written before it was kept: the sum of its
    parts)."""
    if "wall_seconds" in record:
        return record["wall_seconds"]
    return record["prefill_seconds"] + record["decode_seconds"] + record["compile_seconds"]


def summary(records: Sequence[dict]) -> list[dict]:
    """One row per (press, ratio), in the records' order: quality (accuracy in %, or perplexity) per
    context length and over all, cache bytes held as a % of the full cache's, prefill and decode
    tokens/s (compilation left out), compilation seconds, wall seconds per case (everything in),
    number of cases."""
    if not records:
        raise ValueError("records is empty: run a sweep first.")
    lengths = sorted({r["length"] for r in records})
    rows = []
    for (press, ratio), group in _groups(records, "press", "ratio").items():
        by_length = _groups(group, "length")
        rows.append({
            "press": press, "ratio": ratio,
            "by_length": {n: _quality(by_length[(n,)]) if (n,) in by_length else None for n in lengths},
            "overall": _quality(group),
            "cache_percent": 100.0 * sum(r["cache_bytes"] for r in group) / sum(r["full_cache_bytes"] for r in group),
            "cache_mib": float(np.mean([r["cache_bytes"] for r in group])) / MIB,
            "prefill_tps": _rate(group, lambda r: r["context_tokens"] + r["question_tokens"], "prefill_seconds"),
            "decode_tps": _rate(group, lambda r: r["new_tokens"], "decode_seconds"),
            "compile_seconds": sum(r["compile_seconds"] for r in group),
            "wall_seconds": float(np.mean([wall_seconds(r) for r in group])),
            "cases": len(group),
        })
    return rows


def markdown_table(records: Sequence[dict]) -> str:
    """The summary as a markdown table (accuracy in %, string match, or perplexity; memory per case)."""
    rows = summary(records)
    lengths = list(rows[0]["by_length"])
    short = "ppl" if "nll" in records[0] else "acc."
    head = (["press", "ratio"] + [f"{short} @{n}" if n else short for n in lengths] +
            ([f"{short} (all)"] if len(lengths) > 1 else []) +
            ["cache MiB", "cache % of full", "prefill tok/s", "decode tok/s", "compile s", "wall s/case", "cases"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["press"], f"{row['ratio']:.2f}"]
        digits = 2 if short == "ppl" else 1
        cells += ["" if a is None else f"{a:.{digits}f}" for a in row["by_length"].values()]
        cells += [f"{row['overall']:.{digits}f}"] if len(lengths) > 1 else []
        cells += [f"{row['cache_mib']:.1f}", f"{row['cache_percent']:.1f}", f"{row['prefill_tps']:.0f}",
                  f"{row['decode_tps']:.1f}", f"{row['compile_seconds']:.1f}", f"{row['wall_seconds']:.2f}",
                  str(row["cases"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(row: dict) -> str:
    return "full cache" if row["press"] == NO_PRESS else f"{row['press']} {row['ratio']:.2f}"


def plot(records: Sequence[dict], path: str | os.PathLike, title: str = "") -> str:
    """Saves the four plots of a sweep as one PNG at `path` and returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(records)
    presses = list(dict.fromkeys(r["press"] for r in rows))
    colors = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(presses)}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (acc, mem), (pre, dec) = axes

    full = [r for r in rows if r["press"] == NO_PRESS]
    what = metric(records)
    ratios = sorted({r["ratio"] for r in rows if r["press"] != NO_PRESS})
    if len(ratios) > 1:  # a curve per press, from the full cache at ratio 0
        for press in presses:
            if press != NO_PRESS:
                mine = full + sorted((r for r in rows if r["press"] == press), key=lambda r: r["ratio"])
                acc.plot([r["ratio"] for r in mine], [r["overall"] for r in mine], "o-", color=colors[press],
                         label=press)
        if full:
            acc.axhline(full[0]["overall"], color="black", linestyle="--", label="full cache")
        acc.set(xlabel="compression ratio (fraction of entries removed)", ylabel=what)
        acc.legend(fontsize=8, ncol=2)
    elif len(rows) == 1 and len(rows[0]["by_length"]) > 1:  # one setting: against the context length
        points = sorted(rows[0]["by_length"].items())
        acc.plot([n for n, _ in points], [q for _, q in points], "o-", color="black", label=_label(rows[0]))
        acc.set(xlabel="context length (tokens)", ylabel=what)
        acc.legend(fontsize=8)
    else:  # one ratio: a bar per press, the full cache first
        acc.barh(range(len(rows)), [r["overall"] for r in rows], color=[colors[r["press"]] for r in rows])
        acc.set_yticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
        acc.invert_yaxis()
        acc.set(xlabel=what)
    vertical = len(ratios) > 1 or len(rows) == 1 and len(rows[0]["by_length"]) > 1
    if len(ratios) > 1:
        shown = "against compression ratio (all lengths)"
    elif vertical:
        shown = f"of {_label(rows[0])} against context length"
    else:
        shown = f"at ratio {ratios[0]:.2f} (all lengths)" if ratios else "(all lengths)"
    acc.set_title(f"{what.split(' ')[0].capitalize()} {shown}")
    if what == "perplexity":
        (acc.set_yscale if vertical else acc.set_xscale)("log")
    else:
        (acc.set_ylim if vertical else acc.set_xlim)(-5, 105)

    for ratio, group in sorted(_groups(records, "ratio").items()):
        by_length = sorted(_groups(group, "length").items())
        lengths = [n for (n,), _ in by_length]
        label = "full cache" if ratio == (0.0,) else f"ratio {ratio[0]:.2f} (mean over presses)"
        mem.plot(lengths, [np.mean([r["cache_bytes"] for r in g]) / MIB for _, g in by_length], "o-", label=label,
                 color="black" if ratio == (0.0,) else None)
    mem.set(xlabel="context length (tokens)", ylabel="KV cache held per case (MiB)",
            title="Cache memory against context length")
    mem.legend(fontsize=8)

    for ax, key, phase in ((pre, "prefill_tps", "Prefill (context and question)"), (dec, "decode_tps", "Decode")):
        ax.barh(range(len(rows)), [r[key] for r in rows], color=[colors[r["press"]] for r in rows])
        ax.set_yticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="tokens / s (compilation excluded)", title=f"{phase} throughput")
    fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
