"""Tables and plots from a results document (see :mod:`benchmarks.run`)."""

from __future__ import annotations

from pathlib import Path

LM = "lmcodec"


def _bpb(n: int, total: int) -> float:
    return 8 * n / total if total else 0.0


def totals(doc: dict) -> dict[str, dict]:
    """Suite totals per compressor: bytes, bpb and compress/decompress bytes/s."""
    files = doc["files"]
    size = sum(f["bytes"] for f in files)
    out: dict[str, dict] = {}
    names = ([LM] if all(LM in f for f in files) and files else []) + (list(files[0]["baselines"]) if files else [])
    for name in names:
        rows = [f[LM] if name == LM else f["baselines"][name] for f in files]
        packed = sum(r["bytes"] for r in rows)
        cs = sum(r["compress_s"] for r in rows)
        ds = sum(r["decompress_s"] for r in rows)
        out[name] = {"bytes": packed, "bpb": _bpb(packed, size),
                     "compress_Bps": size / cs if cs else None, "decompress_Bps": size / ds if ds else None}
    if names and names[0] == LM:
        lm_bytes = sum(f[LM]["lm_bytes"] for f in files)
        out[LM]["model_bpb"] = (sum(f[LM]["model_bits"] for f in files) / lm_bytes) if lm_bytes else None
    out["_input_bytes"] = {"bytes": size}
    return out


def _speed(v: float | None) -> str:
    if not v:
        return "-"
    for unit, scale in (("MB/s", 1e6), ("KB/s", 1e3)):
        if v >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v:.0f} B/s"


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    files = doc["files"]
    base = list(files[0]["baselines"]) if files else []
    has_lm = bool(files) and all(LM in f for f in files)
    lines = [
        f"### Suite `{meta['suite']}` — {meta['date']}",
        "",
        f"Machine: {meta['machine']}; device: {meta['device']}; commit `{meta['commit']}`; "
        f"model `{meta['model']}` ({meta['model_bytes'] / 1e6:.1f} MB on disk, not counted in any ratio); "
        f"settings: {meta['settings']}.",
        "",
        "Bits per byte (every archive byte counted; lower is better). *model* is the model's "
        "cross-entropy, the ideal the coder approaches.",
        "",
    ]
    head = ["file", "bytes"] + (["model", LM] if has_lm else []) + base
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for f in files:
        row = [f"`{f['file']}`", str(f["bytes"])]
        if has_lm:
            mb = f[LM]["model_bpb"]
            row += ["-" if mb is None else f"{mb:.3f}", f"**{_bpb(f[LM]['bytes'], f['bytes']):.3f}**"]
        row += [f"{_bpb(f['baselines'][b]['bytes'], f['bytes']):.3f}" for b in base]
        lines.append("| " + " | ".join(row) + " |")
    tot = totals(doc)
    row = ["**total**", str(tot["_input_bytes"]["bytes"])]
    if has_lm:
        mb = tot[LM].get("model_bpb")
        row += ["-" if mb is None else f"{mb:.3f}", f"**{tot[LM]['bpb']:.3f}**"]
    row += [f"{tot[b]['bpb']:.3f}" for b in base]
    lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Speed over the suite (input bytes per second, one process):", "",
              "| compressor | compress | decompress |", "|---|---:|---:|"]
    for name, t in tot.items():
        if not name.startswith("_"):
            lines.append(f"| {name} | {_speed(t['compress_Bps'])} | {_speed(t['decompress_Bps'])} |")
    if has_lm and any("prompted" in f for f in files):
        lines += ["", "What a decoding key is worth (same files, with a fitting `--prompt`):", "",
                  "| file | prompt | bpb without | bpb with | bytes saved |", "|---|---|---:|---:|---:|"]
        for f in files:
            if "prompted" in f:
                p = f["prompted"]
                lines.append(f"| `{f['file']}` | {p['prompt']!r} | {_bpb(f[LM]['bytes'], f['bytes']):.3f} | "
                             f"{_bpb(p['bytes'], f['bytes']):.3f} | {f[LM]['bytes'] - p['bytes']} |")
    return "\n".join(lines) + "\n"


def plots(doc: dict, out: Path) -> list[Path]:
    """bpb per file by compressor, and suite speed vs ratio; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = doc["files"]
    if not files:
        return []
    has_lm = all(LM in f for f in files)
    names = ([LM] if has_lm else []) + list(files[0]["baselines"])
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(files) + 3), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [_bpb((f[LM] if name == LM else f["baselines"][name])["bytes"], f["bytes"]) for f in files]
        ax.bar([x + i * width for x in range(len(files))], vals, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(files))])
    ax.set_xticklabels([f["file"].split("/")[-1] for f in files], rotation=20, ha="right")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(f"Suite {doc['meta']['suite']}: bits per byte by compressor")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p1 = out / "bpb.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    tot = totals(doc)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        t = tot[name]
        for key, marker in (("compress_Bps", "o"), ("decompress_Bps", "^")):
            if t[key]:
                ax.scatter(t[key], t["bpb"], marker=marker, s=50)
        ax.annotate(name, (t["compress_Bps"], t["bpb"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("input bytes per second (o compress, ^ decompress; log scale)")
    ax.set_ylabel("bits per byte (suite total)")
    ax.set_title(f"Speed vs ratio, suite {doc['meta']['suite']} ({doc['meta']['device']})")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    p2 = out / "speed_ratio.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]
