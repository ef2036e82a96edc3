"""ShiQ reaches the exact KL-regularised optimum on finite token MDPs (docs/algorithms.md §2.11, §8.5).

A tabular LM (one logit row per state) is fitted with `shiq_loss` on every complete trajectory of
the MDP; its learned policy must equal π* and its logit shift ℓ_θ − ℓ_ref must equal Q*/β, as
computed by backward dynamic programming.
"""

import numpy as np
import pytest
import torch

from llmq.losses import shiq_loss
from llmq.testing import TabularLM, make_batch, random_mdp, soft_optimal, toy_mdp


def fit(mdp, beta, loss_type="multistep", batch=None, precomputed=False, q_model=False):
    batch = make_batch(mdp) if batch is None else batch
    model, reference = TabularLM(mdp, "zeros" if q_model else "reference"), TabularLM.reference(mdp)
    with torch.no_grad():
        ref_logits = reference(batch["input_ids"]).logits
    common = dict(
        input_ids=batch["input_ids"],
        act_mask=batch["act_mask"],
        rewards=batch["rewards"],
        beta=beta,
        gamma=mdp.gamma,
        truncated=batch["truncated"],
        loss_type=loss_type,
        q_model=q_model,
    )
    reference_stats = (
        dict(ref_logp=batch["ref_logp"].double(), ref_lse=batch["ref_lse"].double())
        if precomputed
        else dict(ref_logits=ref_logits)
    )
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=2000,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss, _ = shiq_loss(model(batch["input_ids"]).logits, **reference_stats, **common)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    loss, _ = shiq_loss(model(batch["input_ids"]).logits, **reference_stats, **common)
    return model, reference, loss.item()


def errors(mdp, model, reference, values, beta):
    """Max |π_θ − π*| and max |(ℓ_θ − ℓ_ref) − Q*/β| and |u − V*/β| over every state (support only)."""
    policy_error = shift_error = value_error = 0.0
    for state in mdp.states:
        learned = model.state_logits(state).detach().numpy()[: mdp.n_actions]
        ref = reference.state_logits(state).detach().numpy()[: mdp.n_actions]
        support = np.isfinite(mdp.ref_logits[state])
        policy_error = max(policy_error, np.abs(model.policy_probs(state)[: mdp.n_actions] - values.pi[state]).max())
        shift_error = max(shift_error, np.abs((learned - ref)[support] - values.q[state][support] / beta).max())
        u = np.logaddexp.reduce(learned[support]) - np.logaddexp.reduce(ref[support])
        value_error = max(value_error, abs(u - values.v[state] / beta))
    return policy_error, shift_error, value_error


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_toy_mdp_token_reward(beta):
    mdp = toy_mdp()
    model, reference, loss = fit(mdp, beta)
    policy_error, shift_error, value_error = errors(mdp, model, reference, soft_optimal(mdp, beta), beta)
    assert loss < 1e-12 and policy_error < 1e-4 and shift_error < 1e-3 and value_error < 1e-3
    if beta == 0.5:  # the shifts printed in docs/algorithms.md §8.5
        root_shift = (model.state_logits(()) - reference.state_logits(())).detach().numpy()[:3]
        np.testing.assert_allclose(root_shift, [1.575557, 0.823215, 0.0], atol=1e-5)


def test_toy_mdp_sequence_reward_same_policy_shifted_q():
    beta, token = 0.5, toy_mdp()
    sequence = token.with_sequence_reward()
    model, reference, _ = fit(sequence, beta)
    policy_error, shift_error, _ = errors(sequence, model, reference, soft_optimal(sequence, beta), beta)
    assert policy_error < 1e-4 and shift_error < 1e-3  # ℓ_θ − ℓ_ref = Q*_seq/β
    token_policy = soft_optimal(token, beta).pi
    assert max(np.abs(model.policy_probs(s)[:3] - token_policy[s]).max() for s in token.states) < 1e-4  # same π* (E8)
    ab = sequence.encode("A B")
    shift_ab = (model.state_logits(ab) - reference.state_logits(ab)).detach().numpy()[:3]
    np.testing.assert_allclose(shift_ab, [1 / beta] * 3, atol=1e-3)  # Q*_seq(AB, ·) = (1, 1, 1)


@pytest.mark.parametrize(
    "seed, vocab_size, horizon, beta, gamma, placement",
    [
        (0, 3, 3, 0.5, 1.0, "token"),
        (1, 4, 3, 1.0, 1.0, "sequence"),
        (2, 3, 4, 0.3, 0.9, "token"),
        (3, 5, 2, 2.0, 1.0, "token"),
        (4, 2, 5, 0.7, 0.8, "token"),
        (5, 4, 3, 0.25, 1.0, "sequence"),
    ],
)
def test_seeded_random_mdps_reach_the_exact_optimum(seed, vocab_size, horizon, beta, gamma, placement):
    mdp = random_mdp(seed, vocab_size=vocab_size, horizon=horizon, gamma=gamma, reward_placement=placement)
    model, reference, loss = fit(mdp, beta)
    policy_error, shift_error, value_error = errors(mdp, model, reference, soft_optimal(mdp, beta), beta)
    assert policy_error < 1e-4 and shift_error < 1e-3 and value_error < 1e-3, (
        loss,
        policy_error,
        shift_error,
        value_error,
    )


@pytest.mark.parametrize("seed", range(3))
def test_a_q_model_beside_the_reference_holds_q_star_over_beta_in_its_own_logits(seed):
    """The Q model of cheap guided decoding (§6.5): zero-initialised, its logits added to the frozen reference's."""
    beta, mdp = 0.5, random_mdp(seed, vocab_size=3, horizon=3, gamma=0.9)
    q_model, reference, loss = fit(mdp, beta, q_model=True)
    policy = TabularLM.reference(mdp)
    with torch.no_grad():
        policy.table += q_model.table  # ℓ_θ = ℓ_ref + Q/β
    policy_error, shift_error, value_error = errors(mdp, policy, reference, soft_optimal(mdp, beta), beta)
    assert loss < 1e-12 and policy_error < 1e-4 and shift_error < 1e-3 and value_error < 1e-3


def test_one_step_variant_has_the_same_fixed_point():
    beta, mdp = 0.5, random_mdp(7, vocab_size=3, horizon=3, gamma=0.9)
    model, reference, _ = fit(mdp, beta, loss_type="one_step")
    policy_error, shift_error, _ = errors(mdp, model, reference, soft_optimal(mdp, beta), beta)
    assert policy_error < 1e-4 and shift_error < 1e-3


def test_precomputed_reference_statistics_reach_the_same_optimum():
    beta, mdp = 0.5, toy_mdp()
    model, reference, _ = fit(mdp, beta, precomputed=True)
    policy_error, shift_error, _ = errors(mdp, model, reference, soft_optimal(mdp, beta), beta)
    assert policy_error < 1e-4 and shift_error < 1e-3


def test_truncated_prefixes_bootstrap_consistently_at_the_optimum():
    """Trained on complete trajectories, the optimum also zeroes the residuals of cut prefixes (u(s_{T+1})
    bootstrap)."""
    beta, mdp = 0.5, random_mdp(11, vocab_size=3, horizon=4, gamma=0.9)
    model, reference, _ = fit(mdp, beta)
    prefixes = make_batch(mdp, [s for s in mdp.states if len(s) >= 1])
    assert prefixes["truncated"].all()
    with torch.no_grad():
        kwargs = dict(
            input_ids=prefixes["input_ids"],
            act_mask=prefixes["act_mask"],
            rewards=prefixes["rewards"],
            beta=beta,
            gamma=mdp.gamma,
            ref_logits=reference(prefixes["input_ids"]).logits,
        )
        bootstrapped, _ = shiq_loss(model(prefixes["input_ids"]).logits, truncated=prefixes["truncated"], **kwargs)
        terminal, _ = shiq_loss(model(prefixes["input_ids"]).logits, **kwargs)
    assert bootstrapped.item() < 1e-10 < terminal.item()


def test_zero_reward_loss_is_exactly_zero_at_the_reference():
    mdp = random_mdp(3, vocab_size=4, horizon=3)
    batch = make_batch(mdp)
    reference = TabularLM.reference(mdp)
    logits = reference(batch["input_ids"]).logits
    loss, metrics = shiq_loss(
        logits,
        logits,
        input_ids=batch["input_ids"],
        act_mask=batch["act_mask"],
        rewards=torch.zeros_like(batch["rewards"]),
        beta=0.1,
    )
    assert loss.item() == 0.0 and metrics["delta/abs_mean"] == 0.0


def test_reference_logit_offsets_do_not_change_the_learned_policy():
    beta = 0.5
    first, second = toy_mdp(offset_seed=0), toy_mdp(offset_seed=1)
    model_a, _, _ = fit(first, beta)
    model_b, _, _ = fit(second, beta)
    assert max(np.abs(model_a.policy_probs(s) - model_b.policy_probs(s)).max() for s in first.states) < 1e-6


def test_stochastic_observations_leave_a_residual():
    """Consistency losses assume deterministic transitions (docs/algorithms.md §7.3 item 8): with random
    observations the optimum no longer zeroes the loss — documented on `shiq_loss`."""
    beta, mdp = 0.5, random_mdp(2, vocab_size=3, horizon=3, stochastic_obs=True, obs_rate=1.0)
    assert mdp.obs_probs
    _, _, loss = fit(mdp, beta)
    assert loss > 1e-4
