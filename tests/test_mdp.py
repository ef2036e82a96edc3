"""llmq.mdp on hand-computed cases: the logits/token shift, masks, reward placement, discounted sums."""

import math

import pytest
import torch

from llmq.mdp import (
    action_logit_rows,
    action_mask_from_spans,
    completion_mask,
    last_action_positions,
    reverse_discounted_cumsum,
    sequence_rewards_to_tokens,
    token_logprobs,
)

# Logits are log-weights plus a per-row offset: log π = log(w / Σw) exactly, LSE = log Σw + offset.
WEIGHTS = [
    [[1, 2, 3], [1, 1, 2], [4, 1, 1], [9, 9, 9]],
    [[1, 3, 4], [2, 2, 4], [5, 2, 1], [1, 1, 1]],
]
OFFSETS = [[10.0, -2.0, 0.5, 7.0], [0.0, 3.0, -1.0, 2.0]]
INPUT_IDS = torch.tensor([[2, 0, 2, 1], [0, 1, 2, 0]])


def example_logits() -> torch.Tensor:
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    return (weights.log() + torch.tensor(OFFSETS, dtype=torch.float64)[..., None]).float()


def test_token_logprobs_hand_computed():
    logp, lse = token_logprobs(example_logits(), INPUT_IDS)
    # Row p-1 of the logits scores token p; column 0 has no state before it.
    expected_logp = [
        [0.0, math.log(1 / 6), math.log(2 / 4), math.log(1 / 6)],
        [0.0, math.log(3 / 8), math.log(4 / 8), math.log(5 / 8)],
    ]
    expected_lse = [
        [0.0, math.log(6) + 10.0, math.log(4) - 2.0, math.log(6) + 0.5],
        [0.0, math.log(8) + 0.0, math.log(8) + 3.0, math.log(8) - 1.0],
    ]
    assert logp.dtype == lse.dtype == torch.float32
    assert logp.shape == lse.shape == (2, 4)
    torch.testing.assert_close(logp, torch.tensor(expected_logp), rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, torch.tensor(expected_lse), rtol=0, atol=1e-5)


def test_token_logprobs_ignores_last_logits_row():
    logits = example_logits()
    changed = logits.clone()
    changed[:, -1] = torch.tensor([100.0, -50.0, 3.0])
    for before, after in zip(token_logprobs(logits, INPUT_IDS), token_logprobs(changed, INPUT_IDS)):
        torch.testing.assert_close(before, after, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_lse_is_fp32_over_full_vocabulary(dtype):
    vocab = 1000
    logits = torch.zeros(1, 3, vocab, dtype=dtype)
    input_ids = torch.tensor([[0, 5, 999]])
    logp, lse = token_logprobs(logits, input_ids)
    assert logp.dtype == lse.dtype == torch.float32
    # log(1000) needs all 1000 terms, and fp32: rounded to 16 bits it is off by > 1e-3.
    torch.testing.assert_close(lse, torch.tensor([[0.0, math.log(vocab), math.log(vocab)]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(logp, torch.tensor([[0.0, -math.log(vocab), -math.log(vocab)]]), rtol=0, atol=1e-6)
    low_precision = torch.logsumexp(logits[:, :-1], dim=-1).float()
    assert (low_precision - math.log(vocab)).abs().max() > 1e-3


def test_token_logprobs_of_kept_rows_equal_the_full_ones_there_and_are_zero_elsewhere():
    rows = torch.tensor([0, 2])  # they score positions 1 and 3
    full_logp, full_lse = token_logprobs(example_logits(), INPUT_IDS)
    logp, lse = token_logprobs(example_logits()[:, rows], INPUT_IDS, rows)
    for kept, full in ((logp, full_logp), (lse, full_lse)):
        torch.testing.assert_close(kept[:, [1, 3]], full[:, [1, 3]], rtol=0, atol=0)
        assert (kept[:, [0, 2]] == 0).all()
    with pytest.raises(ValueError, match="with 2 logits rows kept"):
        token_logprobs(example_logits(), INPUT_IDS, rows)


def test_action_logit_rows_are_the_rows_before_any_action_and_a_truncated_rows_bootstrap_state():
    act_mask = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    assert action_logit_rows(act_mask).tolist() == [1, 2, 3]
    # Row 0 is truncated: the state after its last action (position 4) is read through logits row 3, already kept.
    assert action_logit_rows(act_mask, torch.tensor([True, False])).tolist() == [1, 2, 3]
    # Row 1 is truncated: position 5, logits row 4.
    assert action_logit_rows(act_mask, torch.tensor([False, True])).tolist() == [1, 2, 3, 4]


def test_token_logprobs_shape_mismatch():
    with pytest.raises(ValueError, match="do not align"):
        token_logprobs(example_logits(), INPUT_IDS[:, :3])
    with pytest.raises(ValueError, match="do not align"):
        token_logprobs(example_logits()[0], INPUT_IDS[0])


def test_token_logprobs_gradients():
    logits = example_logits().requires_grad_()
    logp, lse = token_logprobs(logits, INPUT_IDS)
    logp.sum().backward()
    # d log π(a|s) / d ℓ(s, v) = 1[v = a] - π(v|s), in the row that scores the token; the last row gets nothing.
    probs = torch.tensor(WEIGHTS, dtype=torch.float32) / torch.tensor(WEIGHTS, dtype=torch.float32).sum(
        -1, keepdim=True
    )
    expected = torch.nn.functional.one_hot(INPUT_IDS[:, 1:], 3).float() - probs[:, :-1]
    torch.testing.assert_close(logits.grad[:, :-1], expected, rtol=0, atol=1e-6)
    assert (logits.grad[:, -1] == 0).all()

    logits.grad = None
    _, lse = token_logprobs(logits, INPUT_IDS)
    lse.sum().backward()
    torch.testing.assert_close(logits.grad[:, :-1], probs[:, :-1], rtol=0, atol=1e-6)
    assert (logits.grad[:, -1] == 0).all()


def test_action_mask_single_and_multi_turn():
    single = action_mask_from_spans([[(3, 6)]], seq_len=6)
    assert single.dtype == torch.bool
    assert single.int().tolist() == [[0, 0, 0, 1, 1, 1]]
    # Row 0: prompt 0-1, agent 2-3, tool output 4-5 (observation), agent 6-7, padding 8.
    multi = action_mask_from_spans([[(2, 4), (6, 8)], [(1, 3)]], seq_len=9)
    assert multi.int().tolist() == [
        [0, 0, 1, 1, 0, 0, 1, 1, 0],
        [0, 1, 1, 0, 0, 0, 0, 0, 0],
    ]


@pytest.mark.parametrize("bad_span", [(0, 2), (3, 10), (4, 3)])
def test_action_mask_invalid_span(bad_span):
    with pytest.raises(ValueError, match="row 1"):
        action_mask_from_spans([[(1, 2)], [bad_span]], seq_len=9)


def test_completion_mask_right_and_left_padding():
    right = completion_mask(torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]), torch.tensor([2, 3]))
    assert right.int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    left = completion_mask(torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]), torch.tensor([4, 3]))
    assert left.int().tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]


def test_last_action_positions():
    act_mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]])
    assert last_action_positions(act_mask).tolist() == [2, 4, -1, 2]
    assert last_action_positions(act_mask.bool()).tolist() == [2, 4, -1, 2]


def test_sequence_rewards_to_tokens():
    act_mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 1]])  # row 1 is multi-turn: the reward goes to its last turn
    token_rewards = sequence_rewards_to_tokens(torch.tensor([1.0, -0.5]), act_mask)
    assert token_rewards.dtype == torch.float32
    assert token_rewards.tolist() == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, -0.5]]


def test_sequence_rewards_to_tokens_row_without_action():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sequence_rewards_to_tokens(torch.tensor([1.0, 1.0]), torch.tensor([[0, 1, 1], [0, 0, 0]]))


# Multi-turn row: prompt 0, agent 1-2, observation 3-4, agent 5-6, padding 7.  Values at non-action
# positions (100) must be ignored.
MULTI_TURN_MASK = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]])
MULTI_TURN_VALUES = torch.tensor([[100.0, 1.0, 2.0, 100.0, 100.0, 3.0, 4.0, 100.0]])


def test_reverse_discounted_cumsum_gamma_one():
    out = reverse_discounted_cumsum(MULTI_TURN_VALUES, 1.0, MULTI_TURN_MASK)
    assert out.tolist() == [[10.0, 10.0, 9.0, 7.0, 7.0, 7.0, 4.0, 0.0]]


def test_reverse_discounted_cumsum_discount_advances_on_actions_only():
    out = reverse_discounted_cumsum(MULTI_TURN_VALUES, 0.9, MULTI_TURN_MASK)
    at_5 = 3 + 0.9 * 4  # 6.6: the observation tokens 3-4 do not consume γ
    at_2 = 2 + 0.9 * at_5  # 7.94
    at_1 = 1 + 0.9 * at_2  # 8.146 = 1 + .9·2 + .81·3 + .729·4
    expected = [[at_1, at_1, at_2, at_5, at_5, at_5, 4.0, 0.0]]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-5)


def test_reverse_discounted_cumsum_rows_are_independent():
    act_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    rewards = sequence_rewards_to_tokens(torch.tensor([1.0, 2.0]), act_mask)
    out = reverse_discounted_cumsum(rewards, 0.9, act_mask)
    torch.testing.assert_close(
        out, torch.tensor([[0.81, 0.81, 0.81, 0.9, 1.0, 0.0], [1.8, 1.8, 2.0, 0.0, 0.0, 0.0]]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    "gamma, weights",
    [(1.0, [0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]), (0.9, [0.0, 1.0, 0.9, 0.0, 0.0, 0.81, 0.729, 0.0])],
)
def test_reverse_discounted_cumsum_gradients(gamma, weights):
    values = MULTI_TURN_VALUES.clone().requires_grad_()
    reverse_discounted_cumsum(values, gamma, MULTI_TURN_MASK)[:, 1].sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([weights]), rtol=0, atol=1e-6)


def test_state_scores_row_p_scores_the_state_before_token_p() -> None:
    from llmq.mdp import state_scores

    logits = torch.randn(2, 4, 5, dtype=torch.bfloat16)
    scores = state_scores(logits)
    assert scores.shape == (2, 4, 5) and scores.dtype == torch.float32
    assert torch.equal(scores[:, 0], torch.zeros(2, 5))
    assert torch.equal(scores[:, 1:], logits[:, :-1].float())
    ids = torch.randint(0, 5, (2, 4))
    logp, lse = token_logprobs(logits, ids)
    torch.testing.assert_close(
        torch.log_softmax(scores[:, 1:], -1).gather(-1, ids[:, 1:, None]).squeeze(-1), logp[:, 1:]
    )
    torch.testing.assert_close(torch.logsumexp(scores[:, 1:], -1), lse[:, 1:])
