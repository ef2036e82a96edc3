"""reward_models: math-verify behind a timeout, GSM8K and MATH extraction and scoring, on tricky and real rows."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from reward_models import (
    extract_flexible,
    extract_strict,
    gold_answer,
    gsm8k_reward,
    last_boxed,
    math_reward,
    score_gsm8k,
    score_math,
)
from reward_models.common import math_equal


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- math_equal ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gold, prediction",
    [
        ("18", "18.00"),
        ("1000", "1,000"),
        ("0.5", "1/2"),
        ("-3", "-3"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("$\\frac{\\sqrt{3}}{2}$", "\\boxed{\\frac{\\sqrt3}{2}}"),
    ],
)
def test_math_equal_equivalent(gold, prediction):
    assert math_equal(gold, prediction) is True


@pytest.mark.parametrize("gold, prediction", [("18", "17"), ("-3", "3"), ("0.5", "0.55"), ("2", "")])
def test_math_equal_different(gold, prediction):
    assert math_equal(gold, prediction) is False


def test_math_equal_pathological_expression_times_out_and_next_call_works():
    # 9^(9^(9^9)) makes sympy compute a huge integer while holding the GIL: only a process can be stopped.
    started = time.perf_counter()
    assert math_equal("\\boxed{5}", "\\boxed{9^{9^{9^{9}}}}", timeout=1.0) is False
    assert time.perf_counter() - started < 5
    assert math_equal("7", "7.0") is True


def test_math_equal_from_worker_threads():
    pairs = [("18", "18.00"), ("0.5", "1/2"), ("3", "4"), ("1000", "1,000")] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda pair: math_equal(*pair), pairs))
    assert results == [True, True, False, True] * 4

    out = []
    thread = threading.Thread(target=lambda: out.append(score_math("\\boxed{\\frac{1}{2}}", "0.5")["reward"]))
    thread.start()
    thread.join()
    assert out == [1.0]


# --- GSM8K extraction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, gold",
    [
        ("She sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### -3", "-3"),
        ("1,234", "1234"),
    ],
)
def test_gold_answer(field, gold):
    assert gold_answer(field) == gold


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 5 + 13 = 18.\n#### 18", "18"),
        ("#### $1,234.50", "1234.5"),
        ("#### -3", "-3"),
        ("#### 18.00", "18"),
        ("#### 1/2", "1/2"),
        ("#### **42**", "42"),
        ("####42", "42"),
        ("#### 3\nNo, #### 7", "7"),  # the last marker wins
        ("#### 5\n#### ", None),  # the last marker carries no number
        ("#### unknown", None),
        ("The answer is 42.", None),
    ],
)
def test_extract_strict(text, expected):
    assert extract_strict(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("It costs $1,234.50.", "1234.5"),
        ("The answer is -3.", "-3"),
        ("He loses -$3", "-3"),
        ("Half of it: 1/2", "1/2"),
        ("so the answer is 42.", "42"),
        ("18.00 dollars", "18"),
        ("pages 3-5", "5"),  # a range, not -5
        ("10 - 3 = 7", "7"),
        ("the list 1,2,3", "3"),  # commas not in groups of three separate numbers
        ("1,000 apples and 20", "20"),
        ("1,000", "1000"),
        ("The final answer is: 1.4E-08", "1.4E-08"),  # the exponent is the number's, not a number 08
        ("about 1.50e10 stars", "1.50e10"),  # no trailing zeros stripped before an exponent
        ("x2 + y", None),  # a digit inside a word is not a number
        ("I cannot solve this.", None),
        ("", None),
    ],
)
def test_extract_flexible(text, expected):
    assert extract_flexible(text) == expected


# --- GSM8K scoring ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, gold, strict, flexible, reward",
    [
        ("5 + 13 = 18\n#### 18", "18", True, True, 1.0),
        ("#### 18.00", "18", True, True, 1.0),
        ("#### 1,000", "1000", True, True, 1.0),
        ("#### $1,234.50", "1234.5", True, True, 1.0),
        ("#### -3", "-3", True, True, 1.0),
        ("#### 3", "-3", False, False, 0.0),
        ("#### 1/2", "0.5", False, False, 1.0),  # exact match misses it, math-verify does not
        ("The answer is 7.", "7", False, True, 1.0),  # no strict answer: the flexible one is scored
        ("#### 5\nWait, it is 7", "7", False, True, 0.0),  # a strict answer takes precedence
        ("#### 7\nsince 3 + 4 = 7 not 8", "7", True, False, 1.0),
        ("I cannot solve this.", "7", False, False, 0.0),
        ("The final answer is: 1.4E-08", "8", False, False, 0.0),
        ("#### 1000", "Total: 10 * 100 = 1,000\n#### 1,000", True, True, 1.0),  # raw answer field as gold
    ],
)
def test_score_gsm8k(completion, gold, strict, flexible, reward):
    score = score_gsm8k(completion, gold)
    assert (score["strict"], score["flexible"], score["reward"]) == (strict, flexible, reward)
    assert score["math_verify"] is (reward == 1.0)


def test_score_gsm8k_answer_field():
    assert score_gsm8k("#### 5\nWait, it is 7", "7")["answer"] == "5"
    assert score_gsm8k("The answer is 7.", "7")["answer"] == "7"
    assert score_gsm8k("no idea", "7")["answer"] is None


def test_gsm8k_reward_trl_signature():
    completions = ["#### 72", "The answer is 72.", "#### 71", "nothing"]
    raw = ["Natalia sold 48 + 24 = <<48+24=72>>72 clips.\n#### 72"] * 4
    assert gsm8k_reward(completions, answer=raw, prompts=["q"] * 4, question=["q"] * 4) == [1.0, 1.0, 0.0, 0.0]
    conversational = [[{"role": "assistant", "content": "#### 1,000"}], [{"role": "assistant", "content": "#### 999"}]]
    assert gsm8k_reward(conversational, answer=["1000", "1000"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        gsm8k_reward(["#### 1"], answer=["1", "2"])


# --- MATH ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{x^{2}}", "x^{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\fbox{3}", "3"),
        ("\\boxed {5}", "5"),
        ("so $\\boxed 5$.", "5"),  # brace-less: one token
        ("\\boxed 42.", "42"),
        ("\\boxed5", "5"),
        ("\\boxed{1} then \\boxed 2", "2"),
        ("\\boxed 2 then \\fbox{1}", "1"),
        ("\\boxedx{3}", None),  # another macro
        ("ends with \\boxed", None),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not structure
        ("\\boxed{}", ""),
        ("The answer is 3.", None),
        ("\\boxed{\\frac{1}{2}", None),  # truncated
        ("\\boxed{1} and finally \\boxed{2", None),  # the last box is unbalanced
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "completion, gold, reward",
    [
        ("Thus $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}", 1.0),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", 1.0),
        ("\\boxed{Evelyn}", "\\text{Evelyn}", 1.0),
        ("\\boxed{4} no wait \\boxed{3}", "3", 1.0),
        ("\\boxed{4} no wait \\boxed{3}", "4", 0.0),
        ("\\boxed{3}", "4", 0.0),
        ("The answer is 3.", "3", 0.0),  # no box, no reward
        ("\\boxed{}", "3", 0.0),
        ("\\boxed{9}", "We get $n = \\boxed{9}$.", 1.0),  # a full solution as gold
    ],
)
def test_score_math(completion, gold, reward):
    score = score_math(completion, gold)
    assert score["reward"] == reward
    assert score["math_verify"] is (reward == 1.0)
    assert score["answer"] == last_boxed(completion)


def test_math_reward_trl_signature():
    completions = ["\\boxed{\\frac{1}{2}}", [{"role": "assistant", "content": "\\boxed{0.5}"}], "\\boxed{2}"]
    assert math_reward(completions, answer=["\\frac{1}{2}"] * 3, problem=["p"] * 3) == [1.0, 1.0, 0.0]


# --- real rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("split, rows", [("test", 1319), ("train", 7473)])
def test_gsm8k_every_gold_is_a_number(data_dir, split, rows):
    data = read_jsonl(data_dir / "gsm8k" / f"{split}.jsonl")
    assert len(data) == rows
    for row in data:
        float(gold_answer(row["answer"]))


def test_gsm8k_test_reference_solutions_score_one(data_dir):
    data = read_jsonl(data_dir / "gsm8k" / "test.jsonl")
    for row in data:
        score = score_gsm8k(row["answer"], row["answer"])
        assert score["strict"] and score["reward"] == 1.0, row["answer"]


def test_math500_reference_solutions_score_one(data_dir):
    path = data_dir / "math500" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"no local MATH-500 copy at {path}")
    data = read_jsonl(path)
    assert len(data) == 500
    for row in data:
        assert last_boxed(row["solution"]) == row["answer"].strip()
        assert score_math(row["solution"], row["answer"])["reward"] == 1.0, row["answer"]
    assert score_math(data[0]["solution"], data[1]["answer"])["reward"] == 0.0


def test_math500_gold_answers_equal_themselves_boxed(data_dir):
    path = data_dir / "math500" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"no local MATH-500 copy at {path}")
    answers = [row["answer"] for row in read_jsonl(path)]
    # math-verify parses LaTeX only inside delimiters: the gold in $...$, the completion boxed.
    failures = [answer for answer in answers if not math_equal(f"${answer}$", f"\\boxed{{{answer}}}")]
    assert len(failures) <= 0.05 * len(answers), failures  # measured: 500 / 500 equal (math-verify 0.9.0)
