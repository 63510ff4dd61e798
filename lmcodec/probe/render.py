"""Heatmaps of a :class:`~lmcodec.probe.probe.ProbeResult`: a self-contained HTML page and a PNG.

Both use one fixed colour scale, 0 to :data:`SURPRISAL_MAX` bits (clamped), so
pictures of different texts can be compared: pale = the model expected the
token, dark red = it was surprised.  Flagged (likely memorized) spans get a
blue outline.  The HTML needs nothing but a browser; the PNG needs matplotlib
(drawn with the Agg canvas directly, so pyplot's global state is untouched).
"""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path
from typing import BinaryIO

from ..errors import LMCodecError
from .probe import ProbeResult

#: Surprisal at (and beyond) which the colour scale saturates.  12 bits = p of 1/4096.
SURPRISAL_MAX = 12.0
#: Colour stops from 0 bits to SURPRISAL_MAX (ColorBrewer YlOrRd, light to dark).
STOPS = [(255, 255, 204), (254, 217, 118), (253, 141, 60), (227, 26, 28), (128, 0, 38)]
FLAG_COLOR = "#1f5fbf"


def surprisal_rgb(bits: float) -> tuple[int, int, int]:
    """Linear interpolation through :data:`STOPS`; the same scale as the PNG's colorbar."""
    x = min(max(bits / SURPRISAL_MAX, 0.0), 1.0) * (len(STOPS) - 1)
    i = min(int(x), len(STOPS) - 2)
    f = x - i
    a, b = STOPS[i], STOPS[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def _text_color(bits: float) -> str:
    return "#ffffff" if bits >= 0.7 * SURPRISAL_MAX else "#000000"


def _tooltip(result: ProbeResult, i: int) -> str:
    t = result.tokens[i]
    lines = [f"{json.dumps(t.text, ensure_ascii=False)}: p = {t.probability:.4g} "
             f"({t.surprisal_bits:.2f} bits), rank {t.rank}"]
    if t.alternatives:
        lines.append("top: " + ", ".join(f"{json.dumps(a.text, ensure_ascii=False)} {a.probability:.3g}"
                                         for a in t.alternatives))
    return "\n".join(lines)


def _summary_rows(result: ProbeResult) -> list[tuple[str, str]]:
    rows = [("model", result.model), ("bytes", str(len(result.data))), ("tokens", str(len(result.tokens))),
            ("bits", f"{result.bits:.1f}"), ("bpb (model)", f"{result.bpb:.3f}"),
            ("zlib_bpb", f"{result.zlib_bpb:.3f}"), ("zlib_ratio", f"{result.zlib_ratio:.3f}"),
            ("flagged spans", str(len(result.flagged_spans)))]
    if result.bits_without_prompt is not None:
        rows += [("prompt bytes", str(result.prompt_bytes)),
                 ("bits without prompt", f"{result.bits_without_prompt:.1f}"),
                 ("prompt saves", f"{result.prompt_saves_bits:.1f} bits")]
    return rows


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table.summary td { padding: 0 1em 0 0; }
.heat { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7;
        border: 1px solid #ccc; padding: 1em; word-break: break-all; }
.heat span { border-radius: 2px; }
.heat span.flag { outline: 2px solid %(flag)s; }
.legend { display: flex; align-items: center; gap: .5em; margin: 1em 0; font-size: 90%%; }
.legend .bar { width: 20em; height: 1em; background: linear-gradient(to right, %(grad)s); }
""".strip()


def render_html(result: ProbeResult, title: str | None = None) -> str:
    """A complete, self-contained HTML page (every text passes through html.escape)."""
    esc = html.escape
    flagged = {i for s in result.flagged_spans for i in range(s.start_token, s.end_token)}
    grad = ", ".join("rgb(%d,%d,%d)" % c for c in STOPS)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<title>{esc(title or 'lmcodec probe')}</title>\n",
        "<style>\n", _CSS % {"flag": FLAG_COLOR, "grad": grad}, "\n</style>\n</head>\n<body>\n",
        f"<h1>{esc(title or 'lmcodec probe')}</h1>\n<table class=\"summary\">\n",
    ]
    for k, v in _summary_rows(result):
        parts.append(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>\n")
    parts.append("</table>\n<div class=\"legend\"><span>0 bits (expected)</span><span class=\"bar\"></span>"
                 f"<span>{SURPRISAL_MAX:g}+ bits (surprising)</span>"
                 f"<span style=\"outline: 2px solid {FLAG_COLOR}\">flagged span</span></div>\n"
                 "<p>Hover a token for its probability and the model's top alternatives.</p>\n")
    parts.append("<div class=\"heat\">")
    for i, t in enumerate(result.tokens):
        r, g, b = surprisal_rgb(t.surprisal_bits)
        cls = ' class="flag"' if i in flagged else ""
        parts.append(f'<span{cls} style="background:rgb({r},{g},{b});color:{_text_color(t.surprisal_bits)}" '
                     f'title="{esc(_tooltip(result, i), quote=True)}">{esc(t.text)}</span>')
    parts.append("</div>\n")
    if result.flagged_spans:
        parts.append("<h2>Flagged spans</h2>\n<ol>\n")
        for s in result.flagged_spans:
            parts.append(f"<li>tokens {s.start_token}&ndash;{s.end_token - 1}, mean p "
                         f"{s.mean_probability:.3f}: <code>{esc(s.text)}</code></li>\n")
        parts.append("</ol>\n")
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def _display(text: str) -> list[str]:
    """A token's text as drawn: lines split at newlines (shown as a return arrow)."""
    text = text.replace("\r", "").replace("\t", "    ")
    pieces = text.split("\n")
    return [p + ("\u21b5" if k < len(pieces) - 1 else "") for k, p in enumerate(pieces)]


def render_png(result: ProbeResult, path: str | Path | BinaryIO, *, width_chars: int = 80,
               max_tokens: int = 1500, title: str | None = None, dpi: int = 150) -> None:
    """Token boxes coloured by surprisal, with a colorbar, written as a PNG to ``path`` (or a binary file).

    Monospace layout: every character is one cell, so boxes line up without
    measuring text.  Only the first ``max_tokens`` tokens are drawn.
    """
    try:
        from matplotlib import colors
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as exc:
        raise LMCodecError("--png needs matplotlib: pip install matplotlib") from exc

    cmap = colors.LinearSegmentedColormap.from_list("surprisal", [tuple(c / 255 for c in s) for s in STOPS])
    norm = colors.Normalize(0.0, SURPRISAL_MAX, clip=True)
    flagged = {i for s in result.flagged_spans for i in range(s.start_token, s.end_token)}
    boxes = []  # (line, col, text, bits, flagged)
    line = col = 0
    for i, t in enumerate(result.tokens[:max_tokens]):
        for k, piece in enumerate(_display(t.text)):
            if k > 0:
                line, col = line + 1, 0
            if not piece:
                continue
            if col and col + len(piece) > width_chars:
                line, col = line + 1, 0
            boxes.append((line, col, piece, t.surprisal_bits, i in flagged))
            col += len(piece)
    n_lines = line + 1

    char_in = 0.1                   # inches per character cell
    line_h = 1.9                    # line height in character widths
    ax_w = width_chars * char_in
    ax_h = n_lines * line_h * char_in
    head, foot = 0.55, 0.85         # title and colorbar space, inches
    fig = Figure(figsize=(ax_w + 0.4, ax_h + head + foot))
    FigureCanvasAgg(fig)
    H = ax_h + head + foot
    ax = fig.add_axes((0.2 / (ax_w + 0.4), foot / H, ax_w / (ax_w + 0.4), ax_h / H))
    ax.set_xlim(0, width_chars)
    ax.set_ylim(n_lines * line_h, 0)
    ax.axis("off")
    fontsize = char_in * 72 / 0.602  # DejaVu Sans Mono's advance is 0.602 em
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the font (CJK, emoji)
        for ln, c, piece, bits, flag in boxes:
            y = ln * line_h + 0.2
            ax.add_patch(Rectangle((c, y), len(piece), line_h - 0.4, facecolor=cmap(norm(bits)),
                                   edgecolor=FLAG_COLOR if flag else "white",
                                   linewidth=1.6 if flag else 0.4))
            ax.text(c, y + (line_h - 0.4) / 2, piece, family="DejaVu Sans Mono", fontsize=fontsize,
                    va="center", ha="left", color=_text_color(bits), parse_math=False)
        heading = title or "lmcodec probe"
        heading += (f"   ({result.model}: {result.bpb:.2f} bits/byte, zlib {result.zlib_bpb:.2f}, "
                    f"ratio {result.zlib_ratio:.3f})")
        fig.text(0.5, 1 - 0.3 / H, heading, ha="center", va="center", fontsize=10, parse_math=False)
        cax = fig.add_axes((0.25, 0.45 / H, 0.5, 0.15 / H))
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
        bar.set_label(f"surprisal, bits (-log2 p; {SURPRISAL_MAX:g}+ saturates; blue = flagged span)",
                      fontsize=8)
        bar.ax.tick_params(labelsize=7)
        fig.savefig(path, format="png", dpi=dpi, facecolor="white")
