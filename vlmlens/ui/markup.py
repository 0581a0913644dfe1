"""HTML snippets of the dashboard: the token strip and side-by-side generations (no gradio)."""
from __future__ import annotations

import html

from ..figures._style import SPAN_COLORS  # one palette for figures and token strips

_SPACE_MARKS = {"▁": " ", "Ġ": " ", "Ċ": "⏎", "<0x0A>": "⏎", "\n": "⏎"}


def show_token(tok: str) -> str:
    """A token as a reader should see it (sentencepiece / BPE space marks made visible)."""
    t = str(tok)
    for k, v in _SPACE_MARKS.items():
        t = t.replace(k, v)
    return t if t.strip() else repr(t)


def _tint(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _chip(text: str, span: str, title: str, *, extra_class: str = "", strong: bool = False) -> str:
    c = SPAN_COLORS.get(span, SPAN_COLORS["other"])
    style = (f"background:{_tint(c, 0.38 if strong else 0.16)};border-bottom:3px solid {c};"
             "padding:1px 4px;margin:1px;border-radius:3px;display:inline-block;font-family:monospace;"
             "white-space:pre")
    return (f'<span class="vl-tok vl-{span} {extra_class}" style="{style}" title="{html.escape(title, quote=True)}">'
            f"{html.escape(text)}</span>")


def token_strip(run) -> str:
    """Every token of ``run`` coloured by span; consecutive image tokens collapse into one chip."""
    s = run.spans
    image = set(s.image_positions)
    gen0 = s.n_prompt
    parts = [_legend()]
    body = []
    i = 0
    while i < s.n_total:
        if i in image:
            j = i
            while j + 1 < s.n_total and (j + 1) in image:
                j += 1
            rows, cols = run.image_grid
            body.append(_chip(f"<image × {j - i + 1}>", "image",
                              f"positions {i}–{j}: {j - i + 1} image tokens ({rows}×{cols} grid)"))
            i = j + 1
            continue
        span = s.label_of(i) if i < gen0 else "generated"
        title = f"position {i} · {span} · id {run.token_ids[i]}"
        if i >= gen0:
            lp = run.token_logprobs[i - gen0]
            title += f" · generated #{i - gen0 + 1} · log p = {lp:.3f}"
        body.append(_chip(show_token(run.tokens[i]), span, title))
        i += 1
    parts.append('<div class="vl-strip" style="line-height:2;">' + "".join(body) + "</div>")
    return "".join(parts)


def _legend() -> str:
    items = "".join(
        f'<span style="margin-right:12px;"><span style="display:inline-block;width:10px;height:10px;'
        f'background:{SPAN_COLORS[n]};margin-right:4px;border-radius:2px;"></span>{n}</span>'
        for n in ("system", "image", "text", "generated"))
    return f'<div class="vl-legend" style="font-size:0.85em;margin-bottom:4px;">{items}</div>'


def first_divergence(base: list[str], other: list[str]) -> int | None:
    """Index of the first generated token where ``other`` differs from ``base`` (None: same)."""
    for i in range(max(len(base), len(other))):
        if i >= len(base) or i >= len(other) or base[i] != other[i]:
            return i
    return None


def generations_table(rows: list[dict]) -> str:
    """Side-by-side generations. Each row: label, tokens (list[str]), and optional kl (summed over
    the output), kept, correct (vs the ground truth; the column shows only when some row has it)
    and div (index of the first generated token that differs from the baseline, the first row;
    computed from the token strings when absent). That token is highlighted; a KL below 0.001
    nats reads "no change"."""
    if not rows:
        return "<p><i>No generations yet.</i></p>"
    base = rows[0]["tokens"]
    truth = any(r.get("correct") is not None for r in rows)
    out = ['<table class="vl-gens" style="border-collapse:collapse;width:100%;">',
           "<tr><th style='text-align:left'>variant</th><th style='text-align:left'>generation</th>"
           "<th>first change</th><th>KL over the output (nats)</th><th>answer kept</th>"
           + ("<th>correct (truth)</th>" if truth else "") + "</tr>"]
    for r in rows:
        toks = r["tokens"]
        div = None if r is rows[0] else (r["div"] if "div" in r else first_divergence(base, toks))
        cells = []
        marked = any(str(t).startswith(("▁", "Ġ")) for t in toks)   # sub-word tokens carry their spaces
        for i, t in enumerate(toks):
            if i == div:
                cells.append(_chip(show_token(t), "generated", f"first token that differs from {rows[0]['label']}",
                                   extra_class="vl-diverge", strong=True).replace(
                                       "border-bottom:3px", "outline:2px solid #D55E00;border-bottom:3px"))
            else:
                cells.append(html.escape(show_token(t)))
        if div is not None and div >= len(toks):
            cells.append('<span class="vl-diverge" style="outline:2px solid #D55E00;">∎ (ends early)</span>')
        kl = r.get("kl")
        kept = r.get("kept")
        corr = r.get("correct")
        kl_txt = "" if kl is None else ("no change" if kl < 1e-3 else f"{kl:.3g}")
        corr_td = (f"<td style='text-align:center'>{'' if corr is None else ('✓' if corr else '✗')}</td>"
                   if truth else "")
        out.append(
            f"<tr class='vl-gen-row' style='border-top:1px solid #ddd'><td><b>{html.escape(str(r['label']))}</b></td>"
            f"<td style='font-family:monospace;white-space:pre-wrap'>{('' if marked else ' ').join(cells) or '<i>(nothing)</i>'}</td>"
            f"<td style='text-align:center'>{'—' if div is None else f'token {div + 1}'}</td>"
            f"<td style='text-align:center'>{kl_txt}</td>"
            f"<td style='text-align:center'>{'' if kept is None else ('✓' if kept else '✗')}</td>{corr_td}</tr>")
    out.append("</table>")
    return "".join(out)


def note(text: str) -> str:
    """A short grey notice (e.g. 'not available in this build')."""
    return f'<p class="vl-note" style="color:#666;font-style:italic;">{html.escape(text)}</p>'
