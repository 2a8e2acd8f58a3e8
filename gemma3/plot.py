"""Plots of what :mod:`gemma3.inspect` records: attention maps, local vs global layers, attention
sinks, KV cache memory, and a standalone HTML attention view.

matplotlib is imported inside the functions (``pip install gemma3[plot]``), so ``import gemma3``
never needs it; :func:`attention_html` needs nothing but the standard library. Every plotting
function returns the matplotlib ``Figure`` (made with pyplot, so Jupyter shows it; close it with
``plt.close(fig)`` in loops).

Conventions: a pattern is ``(q, k)`` float32, rows are queries, columns keys; rows are the *last*
``q`` positions of a ``k``-token context unless ``query_start`` says otherwise (that is what a
full ``hook_pattern``, a ``query_range`` that ends at the last token, and the attention of a
generated token all are). On a local (sliding) layer query ``i`` sees keys ``i - W + 1 .. i``;
the left edge of that band is drawn as a staircase.
"""

from __future__ import annotations

import html as _html
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

_LABEL_LIMIT = 48  # beyond this many tokens an axis gets numeric ticks instead of token text


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("gemma3.plot needs matplotlib: pip install gemma3[plot] "
                          "(or pip install matplotlib)") from e
    return plt


# ---- helpers on the model ------------------------------------------------------------------------


def _ids(model, text_or_ids) -> list[int]:
    if isinstance(text_or_ids, str):
        return model.encode(text_or_ids)
    return [int(t) for t in text_or_ids]


def token_strings(model, ids: Sequence[int]) -> list[str]:
    """One display string per token id (the id itself when the model has no tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [str(int(i)) for i in ids]
    return [tok.decode([int(i)], skip_special=False) for i in ids]


def _is_local(model, layer: int) -> bool:
    cfg = model.config
    return cfg.layer_types[layer] == "sliding_attention" and cfg.sliding_window > 0


def _display(tokens: Sequence[str]) -> list[str]:
    return [t.replace("\n", "\\n").replace("\t", "\\t") if t.strip() else repr(t)[1:-1] or "·"
            for t in tokens]


# ---- attention heatmaps --------------------------------------------------------------------------


def _draw_window(ax, q0: int, nq: int, nk: int, window: int) -> None:
    """Left edge of the sliding band: row i (absolute q0 + r) sees keys >= q0 + r - window + 1."""
    xs, ys = [], []
    for r in range(nq):
        edge = q0 + r - window + 1 - 0.5
        if edge <= -0.5:
            continue
        xs += [edge, edge]
        ys += [r - 0.5, r + 0.5]
    if xs:
        ax.plot(xs, ys, color="tab:red", lw=1.2, ls="--", label=f"window edge (W={window})")


def attention_heatmap(pattern: np.ndarray, tokens: Sequence[str] | None = None,
                      layer: int | None = None, head: int | str | None = None,
                      window: int | None = None, ax=None, query_start: int | None = None,
                      gamma: float = 1.0, title: str | None = None):
    """Heatmap of one attention pattern.

    pattern: ``(q, k)`` probabilities (a ``hook_pattern`` slice ``[head]``, or the ``(k,)`` row of
    a generated token). tokens: ``k`` labels for the keys (the query labels are the last ``q`` of
    them, or from ``query_start``). window: the sliding window of a local layer, drawn as a
    dashed staircase where it cuts the context. gamma < 1 brightens small weights (PowerNorm).
    Returns the Figure.
    """
    plt = _pyplot()
    from matplotlib.colors import PowerNorm

    p = np.asarray(pattern, np.float32)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2:
        raise ValueError(f"pattern must be (q, k) or (k,), got shape {p.shape}")
    nq, nk = p.shape
    q0 = nk - nq if query_start is None else int(query_start)
    if not 0 <= q0 <= nk - nq:
        raise ValueError(f"query_start {q0} does not fit {nq} rows in {nk} keys")
    if tokens is not None and len(tokens) != nk:
        raise ValueError(f"{len(tokens)} tokens for {nk} keys")
    if ax is None:
        w = min(12.0, 2.5 + 0.22 * nk) if nk <= _LABEL_LIMIT else 12.0
        h = min(10.0, 2.0 + 0.22 * nq) if nq <= _LABEL_LIMIT else 8.0
        fig, ax = plt.subplots(figsize=(w, max(h, 2.2)), layout="constrained")
    else:
        fig = ax.figure
    norm = PowerNorm(gamma, vmin=0.0, vmax=1.0) if gamma != 1.0 else None
    im = ax.imshow(p, cmap="viridis", aspect="auto", interpolation="nearest", norm=norm,
                   vmin=None if norm else 0.0, vmax=None if norm else max(float(p.max()), 1e-9))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if window is not None and window > 0:
        _draw_window(ax, q0, nq, nk, window)
        if q0 + nq - window > 0:
            ax.legend(loc="lower left", fontsize=7, framealpha=0.8)
    if tokens is not None:
        shown = _display(tokens)
        if nk <= _LABEL_LIMIT:
            ax.set_xticks(range(nk), shown, rotation=90, fontsize=7)
        if nq <= _LABEL_LIMIT:
            ax.set_yticks(range(nq), [f"{shown[q0 + r]} ({q0 + r})" for r in range(nq)],
                          fontsize=7)
    elif nq <= _LABEL_LIMIT:
        ax.set_yticks(range(nq), [str(q0 + r) for r in range(nq)], fontsize=7)
    ax.set_xlabel("key position")
    ax.set_ylabel("query")
    if title is None:
        parts = []
        if layer is not None:
            parts.append(f"layer {layer}")
        if head is not None:
            parts.append(f"head {head}")
        parts.append("local" if window else "global" if layer is not None else "")
        title = " ".join(s for s in parts if s)
    ax.set_title(title, fontsize=9)
    return fig


def _patterns(model, ids, layers, head, query_range=None) -> dict[int, np.ndarray]:
    """{layer: (q, k)} for one head or the mean over heads."""
    heads = None if head == "mean" else [int(head)]
    if head != "mean" and not 0 <= int(head) < model.config.num_heads:
        raise ValueError(f"head {head} out of range (the model has {model.config.num_heads})")
    names = [f"blocks.{L}.attn.hook_pattern" for L in layers]
    _, cache = model.run_with_cache(ids, names=names, heads=heads, query_range=query_range,
                                    logits="none")
    return {L: cache[f"blocks.{L}.attn.hook_pattern"].mean(axis=0) for L in layers}


def layer_grid(model, text_or_ids, head: int | str = 0, query_range: tuple[int, int] | None = None,
               ncols: int = 6, gamma: float = 0.5):
    """Every layer's attention pattern for one head (or ``head="mean"``), local/global in the
    titles and the window edge drawn on local layers. One forward pass. Returns the Figure."""
    plt = _pyplot()
    from matplotlib.colors import PowerNorm

    ids = _ids(model, text_or_ids)
    cfg = model.config
    layers = list(range(cfg.num_layers))
    pats = _patterns(model, ids, layers, head, query_range)
    q0 = 0 if query_range is None else int(query_range[0])
    ncols = min(ncols, len(layers))
    nrows = -(-len(layers) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.3 * nrows + 0.4),
                             squeeze=False, layout="constrained")
    for L in layers:
        ax = axes[L // ncols][L % ncols]
        p = pats[L]
        ax.imshow(p, cmap="viridis", aspect="auto", interpolation="nearest",
                  norm=PowerNorm(gamma, vmin=0.0, vmax=1.0))
        local = _is_local(model, L)
        if local:
            _draw_window(ax, q0, p.shape[0], p.shape[1], cfg.sliding_window)
        kind = f"local W={cfg.sliding_window}" if local else "GLOBAL"
        ax.set_title(f"L{L} {kind}", fontsize=8, color="black" if local else "tab:red",
                     fontweight="normal" if local else "bold")
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(len(layers), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    hd = "mean over heads" if head == "mean" else f"head {head}"
    fig.suptitle(f"attention per layer ({hd}; {len(ids)} tokens; brightness = p^{gamma})",
                 fontsize=10)
    return fig


# ---- attention sinks -----------------------------------------------------------------------------


def sink_scores(model, text_or_ids) -> np.ndarray:
    """``(layers, heads)`` float32: each head's attention to position 0 (BOS), averaged over the
    query rows 1..T-1 (row 0 can only attend to itself). On a local layer rows further than the
    window from BOS count as 0: they cannot see it."""
    ids = _ids(model, text_or_ids)
    if len(ids) < 2:
        raise ValueError("sink_scores needs at least two tokens")
    cfg = model.config
    names = [f"blocks.{L}.attn.hook_pattern" for L in range(cfg.num_layers)]
    _, cache = model.run_with_cache(ids, names=names, query_range=(1, len(ids)), logits="none")
    return np.stack([cache[n][:, :, 0].mean(axis=1) for n in names]).astype(np.float32)


def sink_summary(model, text_or_ids):
    """Attention to BOS per layer and head (heatmap) and per layer (bar, mean over heads).
    Returns the Figure."""
    plt = _pyplot()
    s = sink_scores(model, text_or_ids)
    n_layers, n_heads = s.shape
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 0.28 * n_layers + 2.2),
                                   gridspec_kw={"width_ratios": [max(n_heads, 2), 4]},
                                   layout="constrained")
    im = ax0.imshow(s, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(im, ax=ax0, fraction=0.08)
    for L in range(n_layers):
        for h in range(n_heads):
            ax0.text(h, L, f"{s[L, h]:.2f}", ha="center", va="center", fontsize=7,
                     color="white" if s[L, h] < 0.6 else "black")
    labels = [f"L{L} {'local' if _is_local(model, L) else 'GLOBAL'}" for L in range(n_layers)]
    ax0.set_yticks(range(n_layers), labels, fontsize=7)
    ax0.set_xticks(range(n_heads), [f"h{h}" for h in range(n_heads)], fontsize=7)
    ax0.set_title("attention to BOS (position 0)", fontsize=9)
    colors = ["tab:blue" if _is_local(model, L) else "tab:red" for L in range(n_layers)]
    ax1.barh(range(n_layers), s.mean(axis=1), color=colors)
    ax1.set_yticks(range(n_layers), labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("mean over heads and queries")
    ax1.set_title("per layer (blue local, red global)", fontsize=9)
    return fig


# ---- KV cache memory -----------------------------------------------------------------------------


def kv_memory(model):
    """KV cache bytes per layer: reserved (max_seq_len for global layers, the window ring for
    local ones) and in use (the cached positions), coloured by kind. Returns the Figure."""
    plt = _pyplot()
    kv = model.kv_cache
    reserved = kv._reserved()
    used = [lkv.nbytes for lkv in kv]
    n = len(reserved)
    mib = 2.0**20
    colors = ["tab:red" if kind == "global" else "tab:blue" for kind, _ in reserved]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * n + 2), 3.6), layout="constrained")
    x = np.arange(n)
    ax.bar(x, [b / mib for _, b in reserved], color=colors, alpha=0.35,
           label="reserved (blue local ring, red global)")
    ax.bar(x, [b / mib for b in used], color=colors, hatch="//", edgecolor="black", lw=0.5,
           label=f"in use ({kv.n_past} positions)")
    ax.set_xticks(x, [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("MiB (K + V, float32)")
    total = sum(b for _, b in reserved)
    cfg = model.config
    all_global = n * model.max_seq_len * 2 * 4 * cfg.num_kv_heads * cfg.head_dim
    ax.set_title(f"KV cache: {total / mib:.1f} MiB reserved; all-global would be "
                 f"{all_global / mib:.1f} MiB ({all_global / max(total, 1):.1f}x)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


# ---- HTML view -----------------------------------------------------------------------------------

_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 12px; }}
#toks {{ line-height: 2.1; font-family: ui-monospace, monospace; font-size: 14px; }}
.tok {{ white-space: pre; padding: 2px 1px; margin: 0 1px; border-radius: 3px;
        border: 1px solid #ddd; cursor: default; }}
.tok.q {{ outline: 2px solid #d62728; }}
.tok.nq {{ color: #999; }}
#info {{ color: #444; font-size: 12px; min-height: 1.4em; }}
</style></head><body>
<h3 style="margin:4px 0">{title}</h3>
<div>{head_select}<span id="info">hover a token: its attention to earlier tokens</span></div>
<div id="toks">{spans}</div>
<script>
const P = {data};
const Q0 = {q0};
let head = 0;
const toks = Array.from(document.querySelectorAll('#toks .tok'));
function paint(i) {{
  const row = P[head][i - Q0];
  let mx = 0;
  for (const v of row) mx = Math.max(mx, v);
  toks.forEach((t, j) => {{
    const a = (row && j < row.length && mx > 0) ? row[j] / mx : 0;
    t.style.background = 'rgba(31,119,180,' + a.toFixed(3) + ')';
    t.title = 'p = ' + (row && j < row.length ? row[j].toFixed(4) : '0');
  }});
  toks.forEach(t => t.classList.remove('q'));
  toks[i].classList.add('q');
  let best = 0;
  for (let j = 1; j < row.length; j++) if (row[j] > row[best]) best = j;
  document.getElementById('info').textContent = 'query ' + i + ' ' +
    JSON.stringify(toks[i].textContent) + ': strongest key ' + best + ' ' +
    JSON.stringify(toks[best].textContent) + ' (p = ' + row[best].toFixed(3) + ')';
}}
toks.forEach((t, i) => {{
  if (i >= Q0 && i - Q0 < P[0].length) t.addEventListener('mouseenter', () => paint(i));
  else t.classList.add('nq');
}});
const sel = document.getElementById('head');
if (sel) sel.addEventListener('change', e => {{ head = +e.target.value; }});
</script></body></html>
"""


def attention_html(pattern: np.ndarray, tokens: Sequence[str], title: str = "attention",
                   head_names: Sequence[str] | None = None, query_start: int | None = None,
                   decimals: int = 4) -> str:
    """A standalone HTML page (inline CSS/JS, no external resources, no torch): hovering a token
    colours every key by the attention that query pays it (scaled to the row's maximum).

    pattern: ``(q, k)`` or ``(heads, q, k)`` (a head selector is added); tokens: ``k`` strings.
    Rows are the last ``q`` tokens unless ``query_start`` is given. Returns the HTML text.
    """
    p = np.asarray(pattern, np.float64)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3:
        raise ValueError(f"pattern must be (q, k) or (heads, q, k), got shape {p.shape}")
    nh, nq, nk = p.shape
    if len(tokens) != nk:
        raise ValueError(f"{len(tokens)} tokens for {nk} keys")
    q0 = nk - nq if query_start is None else int(query_start)
    if not 0 <= q0 <= nk - nq:
        raise ValueError(f"query_start {q0} does not fit {nq} rows in {nk} keys")
    rows = [[[round(float(v), decimals) for v in p[h, r, :q0 + r + 1]] for r in range(nq)]
            for h in range(nh)]  # keys after the query are masked: not shipped
    data = json.dumps(rows, separators=(",", ":")).replace("</", "<\\/")
    spans = "".join(f'<span class="tok" data-i="{i}">{_html.escape(str(t))}</span>'
                    for i, t in enumerate(tokens))
    head_select = ""
    if nh > 1:
        names = list(head_names) if head_names is not None else [f"head {h}" for h in range(nh)]
        opts = "".join(f'<option value="{h}">{_html.escape(names[h])}</option>'
                       for h in range(nh))
        head_select = f'<select id="head">{opts}</select> '
    return _HTML.format(title=_html.escape(title), head_select=head_select, spans=spans,
                        data=data, q0=q0)


def show_html(html: str, height: int = 260) -> Any:
    """Shows an :func:`attention_html` page in Jupyter (inside an iframe, so its script runs and
    its style stays put). Without IPython the page is written to a temporary file whose path is
    returned."""
    try:
        from IPython.display import HTML, display
    except ImportError:
        fd, path = tempfile.mkstemp(suffix=".html", prefix="gemma3_attention_")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        return path
    frame = (f'<iframe srcdoc="{_html.escape(html, quote=True)}" '
             f'style="width:100%;height:{int(height)}px;border:1px solid #ddd"></iframe>')
    with warnings.catch_warnings():  # IPython suggests IFrame, which needs a URL, not a page
        warnings.simplefilter("ignore", UserWarning)
        display(HTML(frame))
    return None
