"""Credit maps: HTML safety, tooltips, legend and colours; PNG validity; per-token decoding."""

import html
import re

import pytest

from llmq.visualize import render_credit_html, render_credit_png, token_strings

_SPAN = re.compile(r'<span class="tok[^"]*" style="background:(#[0-9a-f]{6});color:#[0-9a-f]{6}" title="([^"]*)">')


def _spans(page: str) -> list[tuple[tuple[int, int, int], str]]:
    """(background RGB, unescaped tooltip) for each token span, in order."""
    return [
        (tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5)), html.unescape(title))
        for colour, title in _SPAN.findall(page)
    ]


def test_html_escapes_markup_in_tokens_title_and_prompt():
    tokens = ["<script>", "alert('x')", "</script>", " a & b", ' "q"', "<img src=x onerror=alert(1)>"]
    page = render_credit_html(tokens, [0.1] * len(tokens), title="<b>t</b>", prompt="<script>p</script>")
    body = page.split("<body>", 1)[1]
    assert "<script" not in body and "<img" not in body and "<b>" not in body
    assert "&lt;script&gt;" in body and "&lt;/script&gt;" in body and "a &amp; b" in body
    assert "&lt;script&gt;p&lt;/script&gt;" in body  # the prompt too
    assert "default-src 'none'" in page  # no scripts or remote resources even if escaping slipped


def test_html_tooltips_hold_every_exact_value_and_token():
    tokens = ["The", " answer", " is", " 42", "."]
    values = [0.125, -1.0 / 3.0, 0.0, 2.718281828459045, -7e-05]
    spans = _spans(render_credit_html(tokens, values, title="t", value_name="advantage"))
    assert len(spans) == len(tokens)
    for (_, tooltip), token, value in zip(spans, tokens, values):
        assert f"advantage = {value!r}" in tooltip and repr(token) in tooltip


def test_html_legend_range_and_summary():
    tokens = ["a", " b", " c"]
    page = render_credit_html(tokens, [-0.5, 2.0, 0.25], title="t")
    legend = page.split('<div class="legend">', 1)[1].split("</div>", 1)[0]
    assert "-2" in legend and "+2" in legend  # symmetric in max |value|
    summary = page.split('<table class="summary">', 1)[1]
    assert "+1.75" in summary  # the sum
    assert "-0.5 at #0 &#x27;a&#x27;" in summary and "+2 at #1 &#x27; b&#x27;" in summary


def test_html_colours_diverge_from_white_at_zero():
    spans = _spans(render_credit_html(["n", "z", "h", "p"], [-4.0, 0.0, 2.0, 4.0], title="t"))
    (neg, _), (zero, _), (half, _), (pos, _) = spans
    assert zero == (255, 255, 255)
    assert neg[0] > 200 and neg[1] < 80 and neg[2] < 80  # red
    assert pos[2] > 150 and pos[0] < 100  # blue
    assert all(p < h < 255 for p, h in zip(pos, half))  # half the value: a paler blue, not white


def test_html_keeps_whitespace_and_breaks_lines():
    page = render_credit_html(["Step  1:", "\n", "\tx", "", " "], [0.1, 0.2, 0.3, 0.4, 0.5], title="t")
    response = page.split('<div class="response">', 1)[1].split("</div>", 1)[0]
    assert "Step  1:" in response and "\tx" in response
    assert "↵</span>\n</span>" in response  # a visible mark, then a real line break
    assert 'class="tok empty"' in response  # a merged-away token still gets a visible box
    assert "white-space: pre-wrap" in page


def test_renderers_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="2 tokens but 1 values"):
        render_credit_html(["a", "b"], [1.0], title="t")
    with pytest.raises(ValueError, match="non-finite"):
        render_credit_png(["a", "b"], [1.0, float("nan")], tmp_path / "x.png", title="t")


def _read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_png_is_a_readable_heat_map(tmp_path):
    tokens = ["Natalia", " sold", " $", "48", "/2", " =", " 24", ".\n", "####", " 72"]
    values = [0.1, -0.2, 0.0, 0.5, -0.4, 0.05, 0.3, 0.0, -0.1, 0.9]
    path = render_credit_png(
        tokens, values, tmp_path / "sub" / "credit.png", title="$ sample", value_name="β·log ratio"
    )
    assert path == tmp_path / "sub" / "credit.png"
    image = _read_png(path)
    height, width = image.shape[:2]
    assert 800 < width < 2500 and 200 < height < width
    assert image[..., :3].std() > 0.05  # something was drawn


def test_png_long_response_grows_then_truncates(tmp_path):
    words = [" step", " 12", " +", " 7", " =", " 19", ".", "\n"]
    tokens = [words[i % len(words)] for i in range(400)]
    values = [((i * 37) % 21 - 10) / 10 for i in range(400)]
    short = _read_png(render_credit_png(tokens[:20], values[:20], tmp_path / "short.png", title="t"))
    long = _read_png(render_credit_png(tokens, values, tmp_path / "long.png", title="t"))
    capped = _read_png(render_credit_png(tokens, values, tmp_path / "capped.png", title="t", max_lines=10))
    assert short.shape[0] < capped.shape[0] < long.shape[0]
    assert short.shape[1] == long.shape[1]  # fixed wrapping width


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from llmq.models import load_tokenizer

    return load_tokenizer("tiny-llama")


@pytest.mark.parametrize("text", ["Natalia sold 48 clips.\nThen 24 more: 72 in total!", "Café résumé: é = 1 — naïve"])
def test_token_strings_round_trip_and_stay_aligned(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    strings = token_strings(tokenizer, ids)
    assert len(strings) == len(ids)
    assert "".join(strings) == text
    assert "\ufffd" not in "".join(strings)
    assert "Ġ" not in strings[1]  # readable text, not byte-level symbols


def test_token_strings_put_a_split_character_on_its_first_token(tokenizer):
    ids = tokenizer("é")["input_ids"]
    assert len(ids) == 2  # the tiny tokenizer is byte-level: é is two byte tokens
    assert token_strings(tokenizer, ids) == ["é", ""]


def test_accuracy_against_sampled_tokens_is_a_png_with_one_line_per_run(tmp_path):
    from llmq.visualize import plot_accuracy_vs_sampled_tokens

    entry = lambda tokens, accuracy: {  # noqa: E731
        "sampled_tokens": tokens,
        "accuracy": accuracy,
        "accuracy_ci95": [accuracy - 0.05, accuracy + 0.05],
    }
    curves = {"online ShiQ": [entry(0, 0.1), entry(500, 0.2)], "GRPO": [entry(0, 0.1), entry(520, 0.15)]}
    plot_accuracy_vs_sampled_tokens(curves, tmp_path / "curve.png", title="products")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
