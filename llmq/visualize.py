"""Pictures a person would rather look at than read: credit maps, search trees, accuracy against tokens.

Credit maps: per-token values (DPO implicit rewards, ShiQ advantages, ...) drawn over the response text.

A DPO policy is an implicit Q-function, so ``β·(log π_θ(a_t|s_t) − log π_ref(a_t|s_t))`` says which
tokens drove a preference (§3.5).  These renderers take plain lists — one string
and one value per token — so any per-token view can feed them:

* :func:`token_strings` turns token ids into one readable string per token;
* :func:`render_credit_html` returns a self-contained HTML page (hover a token for its exact value);
* :func:`render_credit_png` writes a matplotlib text heat map.

Both use the same diverging scale: red below 0, white at 0, blue above, symmetric in ``max |value|``
so equal magnitudes get equal intensity whatever their sign.  Blue rather than green keeps the two
sides apart for red-green colour-blind readers.
"""

from __future__ import annotations

import html
import math
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "plot_accuracy_vs_tokens",
    "render_credit_html",
    "render_credit_png",
    "render_search_tree_html",
    "token_strings",
]

_NEGATIVE_RGB = (0xD7, 0x30, 0x27)
_POSITIVE_RGB = (0x45, 0x75, 0xB4)
# A UTF-8 character is at most 4 bytes, but byte-level BPE tokens can straddle character
# boundaries, so a run of incomplete tokens may chain a little further than 4.
_MAX_MERGE = 8
_REPLACEMENT = "\ufffd"


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """One readable string per token id, aligned with ``ids``, whose concatenation is the decoded text.

    Each id is decoded on its own (``convert_ids_to_tokens`` would give byte-level symbols such as
    ``"Ġ"``).  A multi-byte UTF-8 character split over byte tokens decodes to U+FFFD piece by piece,
    so such a run is merged until it decodes cleanly: the whole text goes on the run's first token and
    the others get ``""``, which keeps the list aligned with the per-token values (the renderers draw
    ``""`` as a thin coloured sliver so its value is still visible).  A run that never decodes cleanly
    within a few tokens (truly invalid bytes) falls back to per-token decoding.

    This assumes a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM2), where decoding a token
    alone keeps its leading space.
    """
    ids = [int(i) for i in ids]

    def decode(chunk: list[int]) -> str:
        # Cleanup would turn a lone " ." token into "." and break the concatenation.
        return tokenizer.decode(chunk, clean_up_tokenization_spaces=False)

    strings: list[str] = []
    start = 0
    while start < len(ids):
        text, end = decode(ids[start : start + 1]), start + 1
        if _REPLACEMENT in text:
            for stop in range(start + 2, min(len(ids), start + _MAX_MERGE) + 1):
                merged = decode(ids[start:stop])
                if _REPLACEMENT not in merged:
                    text, end = merged, stop
                    break
        strings.append(text)
        strings.extend([""] * (end - start - 1))
        start = end
    return strings


def _checked_values(tokens: Sequence[str], values: Sequence[float]) -> list[float]:
    floats = [float(v) for v in values]
    if len(floats) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(floats)} values")
    bad = [i for i, v in enumerate(floats) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite values at token positions {bad[:10]}")
    return floats


def _scale(values: Sequence[float]) -> float:
    """Half-width of the symmetric colour range; an all-zero response gets 1 so everything is white."""
    return max((abs(v) for v in values), default=0.0) or 1.0


def _rgb(value: float, scale: float) -> tuple[float, float, float]:
    """Linear blend from white to the end colour, matching CSS gradients and matplotlib's colourbar."""
    t = max(-1.0, min(1.0, value / scale))
    end = _POSITIVE_RGB if t > 0 else _NEGATIVE_RGB
    a = abs(t)
    r, g, b = ((1 - a) + a * c / 255 for c in end)
    return r, g, b


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _text_colour(rgb: Sequence[float]) -> str:
    """Black on light backgrounds, white on dark ones (relative luminance)."""
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#000000" if luminance > 0.45 else "#ffffff"


def _summary(tokens: Sequence[str], values: Sequence[float]) -> dict[str, str]:
    if not values:
        return {"tokens": "0"}
    lo = min(range(len(values)), key=values.__getitem__)
    hi = max(range(len(values)), key=values.__getitem__)
    return {
        "tokens": str(len(values)),
        "sum": f"{math.fsum(values):+.4g}",
        "mean": f"{math.fsum(values) / len(values):+.4g}",
        "min": f"{values[lo]:+.4g} at #{lo} {tokens[lo]!r}",
        "max": f"{values[hi]:+.4g} at #{hi} {tokens[hi]!r}",
    }


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.3em; }
.prompt, .response { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap;
  line-height: 1.7; word-wrap: break-word; }
.prompt { color: #999; border-left: 3px solid #ddd; padding-left: 0.8em; margin-bottom: 1.2em; }
.tok { box-shadow: inset 0 0 0 0.5px #ccc; border-radius: 2px; }
.tok.empty { display: inline-block; width: 0.3em; height: 1.1em; vertical-align: text-bottom; }
.nl { opacity: 0.55; }
.legend { display: flex; align-items: center; gap: 0.6em; margin: 1em 0; font-size: 0.9em; }
.bar { width: 16em; height: 0.9em; border: 1px solid #ccc;
  background: linear-gradient(to right, {neg}, #ffffff, {pos}); }
h2 { font-size: 1em; }
table.summary { border-collapse: collapse; font-size: 0.9em; }
table.summary td { padding: 0.15em 0.8em 0.15em 0; vertical-align: top; }
table.summary td:first-child { color: #666; }
"""


def render_credit_html(
    tokens: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    prompt: str | None = None,
    value_name: str = "implicit reward",
) -> str:
    """A self-contained HTML page showing each response token on a background coloured by its value.

    Hovering a token shows its exact value (``repr`` of the float), index and text.  Newlines show as
    a faint ``↵`` and then break the line; spaces and tabs are kept.  All text is HTML-escaped and a
    Content-Security-Policy forbids scripts and remote resources, so untrusted model output is safe.
    """
    floats = _checked_values(tokens, values)
    scale = _scale(floats)
    esc = html.escape

    spans = []
    for index, (token, value) in enumerate(zip(tokens, floats)):
        rgb = _rgb(value, scale)
        tooltip = f"{value_name} = {value!r}\ntoken #{index}: {token!r}"
        body = esc(token).replace("\n", '<span class="nl">↵</span>\n')
        classes = "tok" if token else "tok empty"
        spans.append(
            f'<span class="{classes}" style="background:{_hex(rgb)};color:{_text_colour(rgb)}" '
            f'title="{esc(tooltip)}">{body}</span>'
        )

    summary_rows = "".join(
        f"<tr><td>{esc(key)}</td><td>{esc(text)}</td></tr>" for key, text in _summary(tokens, floats).items()
    )
    prompt_block = f'<div class="prompt">{esc(prompt)}</div>\n' if prompt is not None else ""
    css = _CSS.replace("{neg}", _hex(_rgb(-1, 1))).replace("{pos}", _hex(_rgb(1, 1)))
    return _page(
        title,
        css,
        f"""<div class="legend"><span>{esc(value_name)}</span>
<span>{-scale:+.4g}</span><span class="bar"></span><span>{scale:+.4g}</span>
<span>(0 = white; hover a token for its exact value)</span></div>
{prompt_block}<div class="response">{"".join(spans)}</div>
<h2>Summary</h2>
<table class="summary">{summary_rows}</table>""",
    )


# PNG layout, in points unless noted.  A monospace font makes text width a function of the
# character count, so the layout needs no renderer round-trips to measure text.
_FONT = "DejaVu Sans Mono"  # ships with matplotlib and has the ↵ glyph
_FONT_SIZE = 10.0
_COLUMN_PT = 0.64 * _FONT_SIZE  # DejaVu Sans Mono advances 0.602 em; the rest is breathing room
_LINE_PT = 1.9 * _FONT_SIZE
_EMPTY_COLUMNS = 0.35  # width of a "" continuation token, so its value stays visible
_DPI = 150
_MARGIN_IN = 0.3
_HEADER_IN = 1.15  # title, summary line, colourbar and its labels
_NOTE_IN = 0.3  # room for the truncation note, only when there is one


def _display(token: str) -> str:
    """The token as drawn in one box: newlines as ↵, tabs expanded, other control characters escaped."""
    out = []
    for char in token:
        if char == "\n":
            out.append("↵")
        elif char == "\t":
            out.append("    ")
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out)


def _columns(text: str) -> int:
    # East-Asian wide characters take two monospace cells.
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _layout(tokens: Sequence[str], width: int) -> list[tuple[int, float, float, str]]:
    """``(line, column, box width in columns, text)`` per token, wrapping at ``width`` columns."""
    boxes = []
    line, column = 0, 0.0
    for token in tokens:
        text = _display(token)
        if not text:
            span = _EMPTY_COLUMNS
        else:
            if _columns(text) > width:
                text = text[: width - 1] + "…"
            span = float(_columns(text))
        if column > 0 and column + span > width:
            line, column = line + 1, 0.0
        boxes.append((line, column, span, text))
        column += span
        if "\n" in token:  # a "\n\n" token leaves a blank line, as in the text
            line, column = line + token.count("\n"), 0.0
    return boxes


def render_credit_png(
    tokens: Sequence[str],
    values: Sequence[float],
    path: str | Path,
    *,
    title: str,
    value_name: str = "implicit reward",
    width: int = 90,
    max_lines: int = 60,
) -> Path:
    """Write a text heat map: each token a box coloured by its value, wrapped at ``width`` columns.

    Newline tokens show as ``↵`` and end the line (the box shows every newline in the token, then
    the text continues that many lines down).  The figure grows with the number of lines up to
    ``max_lines``; tokens beyond that are left out with a note, while the colour scale and summary
    still cover every token.  Returns the written path.
    """
    floats = _checked_values(tokens, values)
    scale = _scale(floats)
    boxes = _layout(tokens, width)
    shown = [box for box in boxes if box[0] < max_lines]
    truncated = len(shown) < len(boxes)
    lines = max((box[0] for box in shown), default=0) + 1

    body_w_in, body_h_in = width * _COLUMN_PT / 72, lines * _LINE_PT / 72
    footer_in = _NOTE_IN if truncated else 0.0
    fig_w_in, fig_h_in = body_w_in + 2 * _MARGIN_IN, _HEADER_IN + body_h_in + footer_in + _MARGIN_IN
    # A Figure on an Agg canvas rather than pyplot: works without a display, leaves the caller's
    # backend (e.g. a notebook's) alone and keeps nothing in pyplot's figure registry.
    fig = Figure(figsize=(fig_w_in, fig_h_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    body = (_MARGIN_IN / fig_w_in, (footer_in + _MARGIN_IN / 2) / fig_h_in, body_w_in / fig_w_in, body_h_in / fig_h_in)
    _draw_token_boxes(fig.add_axes(body), shown, floats, scale, width, lines)
    _draw_header(fig, title, _summary(tokens, floats), scale, value_name, min(4.0, body_w_in), fig_w_in, fig_h_in)
    if truncated:
        note = f"… truncated: showing the first {len(shown)} of {len(boxes)} tokens ({max_lines} lines)"
        fig.text(_MARGIN_IN / fig_w_in, _MARGIN_IN / 2 / fig_h_in, note, fontsize=8, color="#a00", parse_math=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _draw_token_boxes(
    ax, boxes: Sequence[tuple[int, float, float, str]], values: Sequence[float], scale: float, width: int, lines: int
) -> None:
    """One box per token at its (line, column, span), coloured by its value, with its text."""
    ax.set_xlim(0, width)
    ax.set_ylim(lines, 0)  # line 0 at the top
    ax.axis("off")
    for value, (line, column, span, text) in zip(values, boxes):
        rgb = _rgb(value, scale)
        ax.add_patch(Rectangle((column, line + 0.08), span, 0.84, facecolor=rgb, edgecolor="#c8c8c8", linewidth=0.4))
        if text.strip():
            ax.text(
                column + span / 2,
                line + 0.5,
                text,
                ha="center",
                va="center",
                family=_FONT,
                fontsize=_FONT_SIZE,
                color=_text_colour(rgb),
                parse_math=False,  # "$" is common in maths answers
            )


def _draw_header(
    fig,
    title: str,
    stats: dict[str, str],
    scale: float,
    value_name: str,
    bar_w_in: float,
    fig_w_in: float,
    fig_h_in: float,
) -> None:
    """Title, summary line and the diverging colour bar above the body."""
    top = 1 - _MARGIN_IN / 2 / fig_h_in
    fig.text(0.5, top, title, ha="center", va="top", fontsize=12, weight="bold", parse_math=False)
    summary = "   ".join(f"{key} {text}" for key, text in stats.items())
    fig.text(0.5, top - 0.32 / fig_h_in, summary, ha="center", va="top", fontsize=8, color="#444", parse_math=False)
    cax = fig.add_axes(
        (0.5 - bar_w_in / 2 / fig_w_in, 1 - (_HEADER_IN - 0.25) / fig_h_in, bar_w_in / fig_w_in, 0.12 / fig_h_in)
    )
    cmap = LinearSegmentedColormap.from_list("credit", [_rgb(-1, 1), (1, 1, 1), _rgb(1, 1)])
    colourbar = fig.colorbar(
        ScalarMappable(norm=Normalize(-scale, scale), cmap=cmap), cax=cax, orientation="horizontal"
    )
    colourbar.ax.tick_params(labelsize=7)
    colourbar.set_label(value_name, fontsize=8)


def render_search_tree_html(
    nodes: Sequence,
    answer_path: Sequence[int],
    *,
    title: str,
    prompt: str | None = None,
    step_text: Callable[[object], str] = str,
) -> str:
    """A self-contained HTML page of a Q* search tree: every state as a nested list item showing its
    last step, ``f = g + λh`` with ``g`` and ``h``, whether it was expanded or is terminal; the answer's
    path is highlighted.  Text is escaped and scripts are forbidden, as in :func:`render_credit_html`.

    Args:
        nodes: :class:`llmq.decoding.qstar.Node` objects (``id``, ``parent``, ``state``, ``f``, ``g``, ``h``,
        ``expanded``, ``terminal``).
        answer_path: node ids from the root to the answer.
        title: page title.
        prompt: the question, shown above the tree.
        step_text: the text of a state's last step.
    """
    esc = html.escape
    children: dict[int | None, list] = {}
    for node in nodes:
        children.setdefault(node.parent, []).append(node)
    on_path = set(answer_path)

    def item(node) -> str:
        label = "(question)" if node.parent is None else step_text(node.state[-1])
        marks = "".join(mark for flag, mark in ((node.expanded, " expanded"), (node.terminal, " terminal")) if flag)
        classes = "node" + (" path" if node.id in on_path else "") + marks
        below = "".join(item(child) for child in sorted(children.get(node.id, []), key=lambda n: -n.f))
        return (
            f'<li class="{classes}"><span class="step">{esc(label)}</span> <span class="val">f={node.f:.3f} '
            f"g={node.g:.3f} h={node.h:.3f}"
            f"{esc(marks)}</span>{'<ul>' + below + '</ul>' if below else ''}</li>"
        )

    roots = "".join(item(node) for node in children.get(None, []))
    prompt_block = f'<div class="prompt">{esc(prompt)}</div>\n' if prompt is not None else ""
    css = """
body { font-family: sans-serif; margin: 2em; }
.prompt { white-space: pre-wrap; background: #f4f4f4; padding: .6em; margin-bottom: 1em; }
ul { list-style: none; border-left: 1px solid #ccc; margin-left: .6em; padding-left: 1em; }
.step { white-space: pre-wrap; font-family: monospace; }
.val { color: #666; font-size: 85%; }
.path > .step { background: #d8f0d0; font-weight: bold; }
.terminal > .step { border: 1px solid #999; }
"""
    summary = (
        f"<p>{len(nodes)} states, {sum(1 for n in nodes if n.expanded)} expanded; highlighted: the answer's "
        "path. Children are sorted by f.</p>"
    )
    return _page(title, css, f"{summary}\n{prompt_block}<ul>{roots}</ul>")


def _page(title: str, css: str, body: str) -> str:
    """A self-contained page: escaped title, inline style, and a Content-Security-Policy that
    forbids scripts and remote resources (model output is untrusted)."""
    esc = html.escape
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{esc(title)}</title>
<style>{css}</style>
</head>
<body>
<h1>{esc(title)}</h1>
{body}
</body>
</html>
"""


def plot_accuracy_vs_tokens(reports: list[dict], path: Path, labels: Sequence[str]) -> None:
    """Accuracy (first sample, with its 95% interval) against tokens generated per question, one point per report;
    a sampler's pass@k as a dashed line at k answers' tokens, so a search can be read against sampling at equal tokens.
    ``reports`` are ``llmq eval`` reports, ``labels`` their decodings' names."""
    figure = Figure(figsize=(10, 4.5), dpi=120)
    axes = figure.add_subplot()
    curves_drawn = set()
    for index, (report, label) in enumerate(zip(reports, labels)):
        metric, examples = report["metrics"]["first_sample"], report["protocol"]["examples"]
        x, y = report["generated_tokens"] / examples, 100 * metric["mean"]
        low, high = (100 * bound for bound in metric["ci95"])
        axes.errorbar(
            [x],
            [y],
            yerr=[[y - low], [high - y]],
            # colour and marker both change, so points stay apart past ten reports and where two coincide
            color=f"C{index % 10}",
            fmt="osD^vP"[index % 6],
            markersize=7 - index % 3,
            capsize=4,
            label=f"{report['protocol']['model']}: {label}",
        )
        curve = tuple(100 * point["mean"] for point in report.get("pass_at_k", {}).values())
        if curve and curve not in curves_drawn:  # best-of-N and maj@N share their sampler's curve
            curves_drawn.add(curve)
            tokens_per_answer = x / len(curve)
            axes.plot(
                [tokens_per_answer * k for k in range(1, len(curve) + 1)],
                curve,
                "--",
                color="0.4",
                label=f"pass@k of the T={report['protocol']['decoding']['temperature']} sampler, k = 1…{len(curve)}",
            )
    protocol = reports[0]["protocol"]
    axes.set_xlabel("tokens generated per question (all samples)")
    axes.set_ylabel("accuracy, first answer (%)")
    axes.set_title(
        f"{protocol['task']} {protocol['split']}, {protocol['examples']} questions (95% Wilson CI)", fontsize=10
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, never over them
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))


def plot_accuracy_vs_sampled_tokens(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    """Held-out accuracy (with its 95% interval) against the tokens a run has sampled so far, one line per run.

    ``curves`` maps a label to the evaluated entries of a run's round log (``sampled_tokens``, ``accuracy``,
    ``accuracy_ci95``), as ``llmq train --method online`` and ``--method grpo`` write them."""
    figure = Figure(figsize=(8, 4.5), dpi=120)
    axes = figure.add_subplot()
    for index, (label, entries) in enumerate(curves.items()):
        x = [entry["sampled_tokens"] for entry in entries]
        y = [100 * entry["accuracy"] for entry in entries]
        low = [value - 100 * entry["accuracy_ci95"][0] for value, entry in zip(y, entries)]
        high = [100 * entry["accuracy_ci95"][1] - value for value, entry in zip(y, entries)]
        axes.errorbar(
            x, y, yerr=[low, high], color=f"C{index % 10}", fmt="-" + "osD^vP"[index % 6], capsize=3, label=label
        )
    axes.set_xlabel("tokens sampled for training so far")
    axes.set_ylabel("held-out accuracy, greedy (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))
