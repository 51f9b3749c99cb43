"""What a reader needs first, in any format: the verdict, the layers as cells, the near misses
in words, and the report's repetition folded (one row per kind of KV buffer, one row per rule).

Everything here reads a report dict (see `schema.json`) and returns plain values; `html.py`
and `markdown.py` only lay them out.
"""

from __future__ import annotations

import collections
import re

DIAGNOSIS_SUFFIX = "(diagnosis)"
_NUMBER = re.compile(r"\d+")


def layer_key(label: str) -> tuple:
    """Sort key for layer labels: "2" before "10", names after numbers."""
    return (not label.isdigit(), int(label) if label.isdigit() else 0, label)


def lowering_name(layer: dict) -> str | None:
    """The lowering a layer took, when the report records one."""
    return layer.get("lowering") or None


def layers(report: dict) -> list[dict]:
    """The attention layers: as the optimizer recorded them, or (a diff of two files) the
    layers whose attention a kvfuse rule rewrote, read from the rewrites' provenance."""
    if report["layers"]:
        return report["layers"]
    rewritten = [
        r["layer"]
        for r in report["rewrites"]
        if r["rule"].startswith("attention/") and r["layer"] is not None
    ]
    return [{"layer": label, "fused": True} for label in dict.fromkeys(rewritten)]


def lowering_summary(report: dict) -> str | None:
    """ "lowered as X ×28, Y ×2" when the layers record their lowering, else None."""
    names = collections.Counter(
        lowering_name(layer) for layer in layers(report) if layer["fused"] and lowering_name(layer)
    )
    if not names:
        return None
    return "lowered as " + ", ".join(f"{name} ×{count}" for name, count in names.most_common())


def lowering_groups(report: dict) -> list[dict]:
    """Fused layers by the lowering they took and why: one entry per (lowering, reason)."""
    groups: dict[tuple, list[str]] = {}
    for layer in sorted(layers(report), key=lambda item: layer_key(item["layer"])):
        if layer["fused"] and lowering_name(layer):
            key = (lowering_name(layer), layer.get("lowering_reason") or "")
            groups.setdefault(key, []).append(layer["layer"])
    return [{"lowering": k[0], "reason": k[1], "layers": v} for k, v in groups.items()]


def layer_cells(report: dict) -> list[dict]:
    """One cell per attention layer, in layer order: label, fused, lowering, why not."""
    blocked = {b_layer: b for b in blockers(report) for b_layer in b["layers"]}
    cells = []
    for layer in sorted(layers(report), key=lambda item: layer_key(item["layer"])):
        reason = blocked[layer["layer"]]["reason"] if layer["layer"] in blocked else None
        cells.append(
            {
                "layer": layer["layer"],
                "fused": layer["fused"],
                "lowering": lowering_name(layer),
                "lowering_reason": layer.get("lowering_reason") or None,
                "reason": reason,
            }
        )
    return cells


def status(report: dict) -> str:
    """ "ok", "partial" (a layer did not fuse), "failed" (numerics), "unverified" or "diff"."""
    numerics = report.get("numerics")
    if numerics is not None and not numerics["passed"]:
        return "failed"
    found = layers(report)
    if found and not all(layer["fused"] for layer in found):
        return "partial"
    if not found:
        return "diff"
    return "ok" if numerics is not None else "unverified"


def headline(report: dict) -> str:
    """The verdict in one sentence: what kvfuse did and whether it held."""
    found = layers(report)
    fused = sum(layer["fused"] for layer in found)
    state = status(report)
    if state == "diff":
        a, b = report["models"]["a"]["nodes"], report["models"]["b"]["nodes"]
        return f"Graph diff of two models: {a:,} → {b:,} nodes."
    attention = _attention_op(report)
    kv = (report.get("meta") or {}).get("kv")
    cache = f" with a fixed {kv['max_context']:,}-position KV cache updated in place" if kv else ""
    unwritten = (report.get("meta") or {}).get("written") is False
    nothing = ", so nothing was written" if unwritten else ""
    if state == "partial":
        return f"Not optimized: {fused} of {len(found)} attention layers fused{nothing}; why below."
    a, b = report["models"]["a"]["nodes"], report["models"]["b"]["nodes"]
    did = (
        f"Fused {fused}/{len(found)} attention layers into {attention}{cache}: {a:,} → {b:,} nodes"
    )
    if state == "failed":
        return f"{did}, but verification FAILED: the numbers did not hold."
    if state == "unverified":
        return f"{did}; not verified in this report."
    tokens = "greedy tokens equal" if report["numerics"]["tokens_equal"] else "tokens differ"
    return f"{did}; verified against the original ({tokens})."


# shape plumbing a rule creates around the op it fuses into; not what a reader calls "the op"
PLUMBING = frozenset(
    "Constant Reshape Transpose Unsqueeze Squeeze Cast Shape Gather Concat Slice Expand Split "
    "Identity".split()
)


def _attention_op(report: dict) -> str:
    """What the attention rules made: "GroupQueryAttention", or "Attention (+ TensorScatter,
    RotaryEmbedding)" (the onnx target's ops), ignoring the shape plumbing around them."""
    ops = collections.Counter(
        r["op_type"]
        for r in report["rewrites"]
        if r["rule"].startswith("attention/") and r["op_type"] not in PLUMBING
    )
    if not ops:
        return "fused attention"
    main = next((op for op, _ in ops.most_common() if op.endswith("Attention")), None)
    main = main or ops.most_common(1)[0][0]
    extras = [op for op, _ in ops.most_common() if op != main][:2]
    return main + (f" (+ {', '.join(extras)})" if extras else "")


def blockers(report: dict) -> list[dict]:
    """Why layers did not fuse, grouped by cause: the structure in words (the diagnosis when
    there is one), the culprit nodes, and the rule that came closest with how far it got."""
    by_layer = collections.defaultdict(list)
    for miss in report["near_misses"]:
        by_layer[miss["layer"]].append(miss)
    unfused = [layer["layer"] for layer in layers(report) if not layer["fused"]]
    groups: dict[tuple, dict] = {}
    for label in sorted(unfused, key=layer_key):
        cause = _cause(by_layer.get(label, []))
        group = groups.setdefault(
            (cause["reason"], cause["closest_rule"]), {**cause, "layers": [], "culprits": []}
        )
        group["layers"].append(label)
        group["culprits"] += [c for c in cause["culprits"] if c not in group["culprits"]]
    return list(groups.values())


def _cause(misses: list[dict]) -> dict:
    """One layer's near misses as a cause: the diagnosis's words (else the closest rule's
    reason), the culprits of both, and the rule that matched the most nodes."""
    diagnosis = next((m for m in misses if m["rule"].endswith(DIAGNOSIS_SUFFIX)), None)
    tried = [m for m in misses if not m["rule"].endswith(DIAGNOSIS_SUFFIX)]
    closest = max(tried, key=lambda m: m["matched_nodes"], default=None)
    words = diagnosis or closest
    culprits = (diagnosis or {}).get("culprits", []) + (closest or {}).get("culprits", [])
    return {
        "reason": words["reason"]
        if words
        else "no attention rule came close (fewer than 2 nodes matched)",
        "culprits": list(dict.fromkeys(culprits)),
        "closest_rule": closest["rule"] if closest else None,
        "closest_matched": closest["matched_nodes"] if closest else 0,
        "closest_reason": closest["reason"] if closest else None,
    }


def layer_list(labels: list[str]) -> str:
    """ "layer 3", "layers 0–29" or "layers 1, 4–7"."""
    if len(labels) == 1:
        return f"layer {labels[0]}"
    return "layers " + ranges(labels)


def ranges(labels: list[str]) -> str:
    """Numeric labels as runs ("0–2, 4–29"); other labels as they are."""
    parts: list[str] = []
    run: list[int] = []
    for label in sorted(labels, key=layer_key):
        if label.isdigit() and run and int(label) == run[-1] + 1:
            run.append(int(label))
            continue
        if run:
            parts.append(_run(run))
        run = [int(label)] if label.isdigit() else []
        if not label.isdigit():
            parts.append(label)
    if run:
        parts.append(_run(run))
    return ", ".join(parts)


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}–{run[-1]}"


def fold_io(report: dict) -> list[dict]:
    """Inputs and outputs, one row per kind: rows whose names differ only in their numbers and
    whose shapes and change are equal become one row ("60 KV inputs past_key_values.*.key/
    value"), with the names it stands for."""
    aliased = {pair["output"]: pair["input"] for pair in report["io"]["aliases"]}
    groups: dict[tuple, dict] = {}
    for kind in ("inputs", "outputs"):
        for row in report["io"][kind]:
            family = _family(row["name"])
            key = (
                kind,
                row["change"],
                str(row["a"]),
                str(row["b"]),
                row["name"] in aliased,
                family,
            )
            group = groups.setdefault(
                key,
                {
                    "kind": kind[:-1],
                    "change": row["change"],
                    "a": row["a"],
                    "b": row["b"],
                    "in_place": row["name"] in aliased,
                    "names": [],
                    "became_static": row["became_static"],
                },
            )
            group["names"].append(row["name"])
    folded = list(groups.values())
    for group in folded:
        count, kind = len(group["names"]), group["kind"]
        kv = group["in_place"] or "past_key_values" in group["names"][0]
        group["label"] = f"{count} KV {kind}s" if kv else f"{count} {kind}s" if count > 1 else kind
        group["pattern"] = name_pattern(group["names"])
        group["aliases_of"] = name_pattern([aliased[n] for n in group["names"] if n in aliased])
    return folded


def _family(name: str) -> str:
    """Names of one family differ only in their numbers and their last part:
    past_key_values.3.key and past_key_values.7.value are both `past_key_values.*`."""
    template = _NUMBER.sub("*", name)
    return template.rsplit(".", 1)[0] if template != name else name


def name_pattern(names: list[str]) -> str:
    """`past_key_values.*.key/value` for 60 names; the name itself for one."""
    if len(names) <= 1:
        return names[0] if names else ""
    templates = list(dict.fromkeys(_NUMBER.sub("*", name) for name in names))
    if len(templates) > 1:
        stems = {t.rsplit(".", 1)[0] for t in templates}
        if len(stems) == 1 and all("." in t for t in templates):
            tails = "/".join(t.rsplit(".", 1)[1] for t in templates)
            return f"{stems.pop()}.{tails}"
    return ", ".join(templates[:3]) + (" …" if len(templates) > 3 else "")


def fold_rewrites(report: dict) -> list[dict]:
    """One row per rule: how many nodes it created, in which layers, what they replaced."""
    rows: dict[str, dict] = {}
    for rewrite in report["rewrites"]:
        row = rows.setdefault(
            rewrite["rule"],
            {
                "rule": rewrite["rule"],
                "op_types": collections.Counter(),
                "layers": [],
                "created": 0,
                "replaced": 0,
                "replaced_ops": collections.Counter(),
                "items": [],
            },
        )
        row["created"] += 1
        row["op_types"][rewrite["op_type"]] += 1
        row["replaced"] += len(rewrite["replaced"])
        row["replaced_ops"].update(x["op_type"] for x in rewrite["replaced"])
        row["items"].append(rewrite)
        if rewrite["layer"] is not None and rewrite["layer"] not in row["layers"]:
            row["layers"].append(rewrite["layer"])
    for row in rows.values():
        row["layers"].sort(key=layer_key)
    return sorted(rows.values(), key=lambda row: -row["replaced"])


def op_changes(report: dict, limit: int | None = None) -> list[dict]:
    """The op histogram rows that changed, largest |Δ| first; with a `limit`, the largest
    `limit` changes plus every op type that is new in the second model (the fused ops)."""
    changed = [row for row in report["ops"] if row["delta"] != 0]
    changed.sort(key=lambda row: (-abs(row["delta"]), row["op"]))
    if limit is None:
        return changed
    return [row for i, row in enumerate(changed) if i < limit or row["a"] == 0]


def quantization_figures(quantization: dict) -> list[tuple[str, str]]:
    """(label, value) pairs of the quantization summary figures present in the dict."""
    formats = [
        ("scheme", "scheme", "{}"),
        ("bits", "weight bits", "{}"),
        ("block_size", "block size", "{}"),
        ("mean_kld", "mean KLD", "{:.4g}"),
        ("p99_kld", "99% KLD", "{:.4g}"),
        ("p999_kld", "99.9% KLD", "{:.4g}"),
        ("max_kld", "KLD gate", "{:.4g}"),
        ("same_top1", "same top-1", "{:.1%}"),
        ("perplexity_before", "perplexity before", "{:.3f}"),
        ("perplexity_after", "perplexity after", "{:.3f}"),
        ("tokens", "tokens scored", "{:,}"),
    ]
    return [
        (label, fmt.format(quantization[key]))
        for key, label, fmt in formats
        if quantization.get(key) is not None
    ]


def dims(shape: list | None) -> str:
    """[batch_size, 3, 2048, 64]; "—" for a value the model does not have."""
    return "—" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def mib(count: int | float) -> str:
    """Bytes in KiB, MiB or GiB, whichever reads best."""
    if count < 2**20:
        return f"{count / 2**10:,.1f} KiB"
    return f"{count / 2**20:,.1f} MiB" if count < 2**30 else f"{count / 2**30:,.2f} GiB"


def share(fraction: float) -> str:
    """A fraction as a per cent with two significant digits: 67%, 3.2%, 0.12%."""
    return f"{float(f'{fraction * 100:.2g}'):g}%"


def megabytes(count: int | float) -> str:
    return f"{count / 1e6:,.1f} MB"


def size_pair(before: int, after: int) -> str:
    """ "539 → 539 MB": two byte counts in the unit of the larger."""
    unit, scale = ("GB", 1e9) if max(before, after) >= 1e10 else ("MB", 1e6)
    digits = 0 if max(before, after) >= 100 * scale else 1
    return f"{before / scale:,.{digits}f} → {after / scale:,.{digits}f} {unit}"


def percent_change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}".replace("-", "−") if before else ""
