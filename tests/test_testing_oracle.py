"""llmq.testing: the exact oracle reproduces docs/algorithms.md §8.3–8.5 and the property tests of §8.6."""

import numpy as np
import pytest
import torch

from llmq.mdp import token_logprobs
from llmq.testing import (
    NON_ACTION_LOGIT,
    TabularLM,
    TokenMDP,
    evaluate,
    exponential_utility_q,
    hard_optimal,
    make_batch,
    policy_summary,
    random_mdp,
    soft_optimal,
    toy_mdp,
)

# The document prints 6 decimals: an exact oracle is within rounding (5e-7) of every number.
PRINTED = 1e-6

# §8.3, β = 0.5, columns (A, B, EOS); "AA" stands for the row "AA, BA", "AB" for "AB, BB".
TABLE_05 = {
    # state: (Q*, V*, π*, A*, Q^{π_ref}, V^{π_ref}, Q_hard)
    "": (
        (0.787779, 0.411607, 0),
        0.596970,
        (0.732325, 0.207070, 0.060605),
        (0.190808, -0.185363, -0.596970),
        (0.6, 0.2, 0),
        0.36,
        (1, 1, 0),
    ),
    "A": (
        (0.716890, 1, 0),
        0.787779,
        (0.173563, 0.764369, 0.062068),
        (-0.070888, 0.212221, -0.787779),
        (0.5, 1, 0),
        0.6,
        (1, 1, 0),
    ),
    "B": (
        (0.716890, 0, 0),
        0.411607,
        (0.736589, 0.087804, 0.175607),
        (0.305283, -0.411607, -0.411607),
        (0.5, 0, 0),
        0.2,
        (1, 0, 0),
    ),
    "AA": (
        (0, 1, 0),
        0.716890,
        (0.047681, 0.880797, 0.071522),
        (-0.716890, 0.283110, -0.716890),
        (0, 1, 0),
        0.5,
        (0, 1, 0),
    ),
    "AB": ((0, 0, 0), 0, (0.4, 0.2, 0.4), (0, 0, 0), (0, 0, 0), 0, (0, 0, 0)),
}
# §8.4, β = 1.0: (Q*, V*, π*).
TABLE_1 = {
    "": ((0.708513, 0.295395, 0), 0.481550, (0.627392, 0.249043, 0.123565)),
    "A": ((0.620115, 1, 0), 0.708513, (0.183079, 0.669208, 0.147713)),
    "B": ((0.620115, 0, 0), 0.295395, (0.553457, 0.148848, 0.297695)),
    "AA": ((0, 1, 0), 0.620115, (0.107577, 0.731059, 0.161365)),
    "AB": ((0, 0, 0), 0, (0.4, 0.2, 0.4)),
}
SAME_ROW = {"AA": ["A A", "B A"], "AB": ["A B", "B B"]}
# §8.5 ShiQ: ℓ_θ − ℓ_ref = Q*/β at β = 0.5.
SHIQ_SHIFT_05 = {
    "": (1.575557, 0.823215, 0),
    "A": (1.433781, 2, 0),
    "B": (1.433781, 0, 0),
    "AA": (0, 2, 0),
    "AB": (0, 0, 0),
}


def toy_rows(mdp: TokenMDP, table: dict):
    for key, values in table.items():
        for name in SAME_ROW.get(key, [" ".join(key)]):
            yield mdp.encode(name), values


def assert_printed(actual, printed, what: str) -> None:
    actual, printed = np.asarray(actual, dtype=np.float64), np.asarray(printed, dtype=np.float64)
    assert np.abs(actual - printed).max() <= PRINTED, f"{what}: {actual} != printed {printed}"


def cd_policy(mdp: TokenMDP, lam: float) -> dict:
    """Controlled decoding π_ref · exp(λ Q^{π_ref}), normalised per state (§8.3 policy table)."""
    q_ref = evaluate(mdp).q
    weights = {s: mdp.reference_policy[s] * np.exp(lam * q_ref[s]) for s in mdp.states}
    return {s: w / w.sum() for s, w in weights.items()}


def perturbed(policy: dict, seed: int, scale: float = 0.3) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for s, p in policy.items():
        w = p * np.exp(scale * rng.normal(size=p.shape))
        out[s] = w / w.sum()
    return out


def max_gap(a: dict, b: dict, shift: dict | None = None) -> float:
    return max(float(np.abs(np.asarray(a[s]) - np.asarray(b[s]) - (shift[s] if shift else 0)).max()) for s in a)


# --- §8.2 structure ---------------------------------------------------------------------------


def test_toy_mdp_structure():
    mdp = toy_mdp()
    assert mdp.actions == ("A", "B", "EOS") and mdp.horizon == 3 and mdp.gamma == 1.0
    assert sorted(mdp.decode(s) for s in mdp.states) == ["", "A", "A A", "A B", "B", "B A", "B B"]
    assert [len(s) for s in mdp.states] == sorted((len(s) for s in mdp.states), reverse=True)
    trajectories = mdp.trajectories()
    assert len(trajectories) == 15
    assert sum(p for _, p in trajectories) == pytest.approx(1, abs=1e-15)
    assert sum(p * mdp.trajectory_return(y) for y, p in trajectories) == pytest.approx(0.36, abs=1e-15)
    expected_ref = {
        "": (0.5, 0.3, 0.2),
        "A": (0.2, 0.5, 0.3),
        "B": (0.4, 0.2, 0.4),
        "B A": (0.2, 0.5, 0.3),
        "A B": (0.4, 0.2, 0.4),
    }
    for name, probs in expected_ref.items():
        np.testing.assert_allclose(mdp.reference_policy[mdp.encode(name)], probs, atol=1e-15)
    # The reference logits are not normalised log-probs: every state carries its own offset.
    offsets = [np.logaddexp.reduce(mdp.ref_logits[s]) for s in mdp.states]
    assert min(abs(c) for c in offsets) > 0.05 and len({round(c, 6) for c in offsets}) == 7
    assert toy_mdp(offset_seed=None).ref_logits[()] == pytest.approx(np.log([0.5, 0.3, 0.2]))


# --- §8.3 and §8.4 tables ---------------------------------------------------------------------


@pytest.mark.parametrize("offset_seed", [0, None])
def test_toy_beta_05_state_table(offset_seed):
    mdp = toy_mdp(offset_seed)
    soft, ref, hard = soft_optimal(mdp, 0.5), evaluate(mdp), hard_optimal(mdp)
    for s, (q, v, pi, adv, q_ref, v_ref, q_hard) in toy_rows(mdp, TABLE_05):
        name = repr(mdp.decode(s))
        assert_printed(soft.q[s], q, f"Q*({name})")
        assert_printed(soft.v[s], v, f"V*({name})")
        assert_printed(soft.pi[s], pi, f"π*({name})")
        assert_printed(soft.q[s] - soft.v[s], adv, f"A*({name})")
        assert_printed(ref.q[s], q_ref, f"Q^π_ref({name})")
        assert_printed(ref.v[s], v_ref, f"V^π_ref({name})")
        assert_printed(hard.q[s], q_hard, f"Q_hard({name})")
        # (E1): β log π*/π_ref = A*.
        np.testing.assert_allclose(
            0.5 * (np.log(soft.pi[s]) - mdp.ref_log_probs(s)), soft.q[s] - soft.v[s], atol=1e-12
        )


def test_toy_beta_1_state_table():
    mdp = toy_mdp()
    soft = soft_optimal(mdp, 1.0)
    for s, (q, v, pi) in toy_rows(mdp, TABLE_1):
        assert_printed(soft.q[s], q, f"Q*({mdp.decode(s)!r})")
        assert_printed(soft.v[s], v, f"V*({mdp.decode(s)!r})")
        assert_printed(soft.pi[s], pi, f"π*({mdp.decode(s)!r})")


@pytest.mark.parametrize(
    ("beta", "rows"),
    [
        # policy: (KL, E[R], J)
        (0.5, {"ref": (0, 0.36, 0.36), "star": (0.418188, 0.806064, 0.596970), "cd": (0.366760, 0.771638, 0.588258)}),
        (1.0, {"star": (0.123042, 0.604592, 0.481550), "cd": (0.111227, 0.591059, 0.479832)}),
    ],
)
def test_toy_policy_level_table(beta, rows):
    mdp = toy_mdp()
    soft = soft_optimal(mdp, beta)
    policies = {"ref": mdp.reference_policy, "star": soft.pi, "cd": cd_policy(mdp, 1 / beta)}
    for name, printed in rows.items():
        summary = policy_summary(mdp, policies[name], beta)
        assert_printed((summary.kl, summary.expected_return, summary.objective), printed, f"{name} at β={beta}")
    # J(π*) = V*(root): π* is the maximiser of the objective.
    assert policy_summary(mdp, soft.pi, beta).objective == pytest.approx(soft.v[()], abs=1e-12)


def test_toy_sequence_reward_variant():
    mdp = toy_mdp()
    tok, seq = soft_optimal(mdp, 0.5), soft_optimal(mdp.with_sequence_reward(), 0.5)
    for s in mdp.states:
        if mdp.decode(s) == "A B":
            assert_printed(seq.q[s], (1, 1, 1), "Q*_seq(AB)")
            assert_printed(seq.v[s], 1, "V*_seq(AB)")
            assert mdp.collected_reward(s) == 1
        else:
            np.testing.assert_allclose(seq.q[s], tok.q[s], atol=1e-15)
            assert seq.v[s] == pytest.approx(tok.v[s], abs=1e-15)
        np.testing.assert_allclose(seq.pi[s], tok.pi[s], atol=1e-15)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_toy_sequence_level_cross_checks(beta):
    mdp = toy_mdp()
    soft = soft_optimal(mdp, beta)
    ref_probs = dict(mdp.trajectories())
    log_z = np.log(sum(p * np.exp(mdp.trajectory_return(y) / beta) for y, p in ref_probs.items()))
    # V*(root) = β log Z, Z = Σ_y π_ref(y) e^{R(y)/β}.
    assert soft.v[()] == pytest.approx(beta * log_z, abs=1e-14)
    if beta == 0.5:
        assert_printed(beta * log_z, 0.596970, "β log Z")
    # Π_t π*(a_t|s_t) = π_ref(y) e^{R(y)/β} / Z for every complete response (E2).
    for y, p_star in mdp.trajectories(soft.pi):
        assert p_star == pytest.approx(ref_probs[y] * np.exp(mdp.trajectory_return(y) / beta - log_z), abs=1e-15)
    # Q♯ identity (E6): deterministic transitions, γ = 1.
    assert max_gap(exponential_utility_q(mdp, beta), soft.q) < 1e-14


def test_toy_fixed_points_of_section_8_5():
    mdp, beta = toy_mdp(), 0.5
    soft, hard = soft_optimal(mdp, beta), hard_optimal(mdp)
    for s, shift in toy_rows(mdp, SHIQ_SHIFT_05):
        assert_printed(soft.q[s] / beta, shift, f"ShiQ logit shift at {mdp.decode(s)!r}")
    assert_printed(soft.v[()] / beta, 1.193941, "ShiQ root value shift")
    # (E5): logits ℓ_ref + Q*/β sample π* and their LSE moves by exactly V*/β, offsets included.
    shiq = TabularLM(mdp)
    with torch.no_grad():
        for s in mdp.states:
            shiq.state_logits(s).add_(torch.from_numpy(soft.q[s] / beta))
    for s in mdp.states:
        np.testing.assert_allclose(shiq.policy_probs(s), soft.pi[s], atol=1e-14)
        lse_shift = torch.logsumexp(shiq.state_logits(s), 0).item() - np.logaddexp.reduce(mdp.ref_logits[s])
        assert lse_shift == pytest.approx(soft.v[s] / beta, abs=1e-12)
    # TBRM root logits: Q*/β + log π_ref.
    assert_printed(soft.q[()] / beta + mdp.ref_log_probs(()), (0.882410, -0.380758, -1.609438), "TBRM root logits")
    # Q-SFT targets: π_ref · Q_hard.
    for name, target in {
        "": (0.5, 0.3, 0),
        "A": (0.2, 0.5, 0),
        "B": (0.4, 0, 0),
        "B A": (0, 0.5, 0),
        "B B": (0, 0, 0),
    }.items():
        s = mdp.encode(name)
        np.testing.assert_allclose(mdp.reference_policy[s] * hard.q[s], target, atol=1e-15)


# --- §8.6 property tests on random MDPs -----------------------------------------------------------


@pytest.mark.parametrize("stochastic_obs", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_reward_placement_invariance(seed, stochastic_obs):
    """(E8): moving the reward to the last action keeps π* and shifts Q*, V* by C(s)."""
    mdp = random_mdp(seed, vocab_size=3, horizon=4, stochastic_obs=stochastic_obs)
    seq_mdp = mdp.with_sequence_reward()
    for s in mdp.states:
        for a in range(mdp.n_actions):
            if not mdp.is_terminal(s + (a,)):
                assert seq_mdp.rewards[s][a] == 0
    collected = {s: mdp.collected_reward(s) for s in mdp.states}
    assert max(abs(c) for c in collected.values()) > 0.1
    for beta in (0.3, 2.0):
        tok, seq = soft_optimal(mdp, beta), soft_optimal(seq_mdp, beta)
        assert max_gap(seq.q, tok.q, collected) < 1e-12
        assert max(abs(seq.v[s] - tok.v[s] - collected[s]) for s in mdp.states) < 1e-12
        assert max_gap(seq.pi, tok.pi) < 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_beta_limits(seed):
    mdp = random_mdp(seed, vocab_size=4, horizon=3, stochastic_obs=seed == 2)
    ref, hard = evaluate(mdp), hard_optimal(mdp)
    # β → ∞: π* → π_ref and Q* → Q^{π_ref}, at rate 1/β (E7).
    gaps = [max_gap(soft_optimal(mdp, beta).q, ref.q) for beta in (1e3, 1e4)]
    assert gaps[1] < 1e-3 and gaps[1] < gaps[0] / 5
    assert max_gap(soft_optimal(mdp, 1e4).pi, mdp.reference_policy) < 1e-3
    # β → 0: Q* → Q_hard from below, and π* concentrates on argmax Q_hard.
    beta = 1e-4
    small = soft_optimal(mdp, beta)
    worst_log_ref = max(-mdp.ref_log_probs(s).min() for s in mdp.states)
    for s in mdp.states:
        assert (small.q[s] <= hard.q[s] + 1e-12).all()
        assert (hard.q[s] - small.q[s]).max() <= mdp.horizon * beta * worst_log_ref
        assert small.pi[s][hard.pi[s] > 0].sum() > 1 - 1e-6


def test_beta_to_zero_splits_ties_on_the_toy():
    mdp = toy_mdp()
    small, hard = soft_optimal(mdp, 1e-3), hard_optimal(mdp)
    np.testing.assert_allclose(hard.pi[()], (0.5, 0.5, 0))  # Q_hard(root) = (1, 1, 0)
    assert small.pi[()][:2].sum() > 1 - 1e-12


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beta", [0.1, 1.0, 7.0])
def test_bandit_closed_form(seed, beta):
    """H = 1: π*(a) ∝ π_ref(a) e^{r(a)/β}, V* = β log Σ π_ref e^{r/β}."""
    mdp = random_mdp(seed, vocab_size=5, horizon=1)
    assert mdp.states == ((),)
    soft = soft_optimal(mdp, beta)
    ref, r = mdp.reference_policy[()], mdp.rewards[()]
    np.testing.assert_allclose(soft.q[()], r, atol=1e-15)
    assert soft.v[()] == pytest.approx(beta * np.log(np.sum(ref * np.exp(r / beta))), abs=1e-12)
    np.testing.assert_allclose(soft.pi[()], ref * np.exp(r / beta) / np.sum(ref * np.exp(r / beta)), atol=1e-14)


def assert_soft_bellman(mdp: TokenMDP, beta: float) -> None:
    """B1–B3 with the expectation over observations written out, and π* beats perturbations of it."""
    soft = soft_optimal(mdp, beta)
    for s in mdp.states:
        for a in range(mdp.n_actions):
            nxt = s + (a,)
            if mdp.is_terminal(nxt):
                expected_next = 0.0
            elif nxt in mdp.obs_probs:
                expected_next = sum(p * soft.v[nxt + (mdp.bos_id + 1 + o,)] for o, p in enumerate(mdp.obs_probs[nxt]))
            else:
                expected_next = soft.v[nxt]
            assert soft.q[s][a] == pytest.approx(mdp.rewards[s][a] + mdp.gamma * expected_next, abs=1e-12)  # (B1)
        ref = mdp.reference_policy[s]
        assert soft.v[s] == pytest.approx(beta * np.log(np.sum(ref * np.exp(soft.q[s] / beta))), abs=1e-12)  # (B2)
        np.testing.assert_allclose(soft.pi[s], ref * np.exp((soft.q[s] - soft.v[s]) / beta), atol=1e-12)  # (B3)
    best = policy_summary(mdp, soft.pi, beta).objective
    assert best == pytest.approx(soft.v[()], abs=1e-10)
    for seed in range(3):
        assert policy_summary(mdp, perturbed(soft.pi, seed), beta).objective < best - 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_discount_breaks_exponential_utility_but_not_bellman(seed):
    """(§8.6.7) γ < 1: E6 / Q♯ fails while B1–B3 and the optimality of π* hold."""
    beta = 0.5
    exact = random_mdp(seed, vocab_size=3, horizon=3, gamma=1.0)
    assert max_gap(exponential_utility_q(exact, beta), soft_optimal(exact, beta).q) < 1e-12
    discounted = random_mdp(seed, vocab_size=3, horizon=3, gamma=0.8)
    assert max_gap(exponential_utility_q(discounted, beta), soft_optimal(discounted, beta).q) > 1e-2
    assert_soft_bellman(discounted, beta)


@pytest.mark.parametrize("seed", range(3))
def test_dp_is_exact_with_stochastic_observations(seed):
    """(§8.6.6) The DP stays exact with observation steps; E6 (expectation inside the log) does not."""
    beta = 0.5
    mdp = random_mdp(seed, vocab_size=3, horizon=3, stochastic_obs=True)
    assert mdp.obs_probs and mdp.n_tokens == mdp.n_actions + 1 + 2
    assert any(s and s[-1] > mdp.bos_id for s in mdp.states)
    assert_soft_bellman(mdp, beta)
    ref_trajectories = mdp.trajectories()
    assert sum(p for _, p in ref_trajectories) == pytest.approx(1, abs=1e-14)
    assert evaluate(mdp).v[()] == pytest.approx(
        sum(p * mdp.trajectory_return(y) for y, p in ref_trajectories), abs=1e-12
    )
    assert max_gap(exponential_utility_q(mdp, beta), soft_optimal(mdp, beta).q) > 1e-3


def test_random_mdp_options():
    a, b = (
        random_mdp(5, vocab_size=4, horizon=3, stochastic_obs=True),
        random_mdp(5, vocab_size=4, horizon=3, stochastic_obs=True),
    )
    assert a.states == b.states and all((a.ref_logits[s] == b.ref_logits[s]).all() for s in a.states)
    assert a.actions == ("t0", "t1", "t2", "EOS") and a.observations == ("o0", "o1")
    seq = random_mdp(5, vocab_size=4, horizon=3, reward_placement="sequence")
    for s in seq.states:
        for act in range(seq.n_actions):
            assert seq.is_terminal(s + (act,)) or seq.rewards[s][act] == 0
    assert any(seq.rewards[s].any() for s in seq.states)


# --- TabularLM ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mdp", [toy_mdp(), random_mdp(1, vocab_size=3, horizon=3, stochastic_obs=True)], ids=["toy", "observations"]
)
def test_reference_tabular_lm(mdp):
    ref = TabularLM.reference(mdp)
    assert not any(p.requires_grad for p in ref.parameters())
    for s in mdp.states:
        # The logits carry the offsets c(s); the log-probs are exactly log π_ref.
        np.testing.assert_array_equal(ref.state_logits(s).numpy(), mdp.ref_logits[s])
        np.testing.assert_allclose(torch.log_softmax(ref.state_logits(s), 0).numpy(), mdp.ref_log_probs(s), atol=1e-14)
    batch = make_batch(mdp)
    logits = ref(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (*batch["input_ids"].shape, mdp.n_tokens)
    # Read through the one HF-convention helper, the model reproduces the batch's reference statistics.
    logp, lse = token_logprobs(logits, batch["input_ids"])
    act = batch["act_mask"]
    torch.testing.assert_close(logp[act], batch["ref_logp"][act].double(), rtol=0, atol=1e-6)
    has_state = batch["ref_lse"] != 0
    torch.testing.assert_close(lse[has_state], batch["ref_lse"][has_state].double(), rtol=0, atol=1e-5)
    rows = ref.state_rows(batch["input_ids"])
    for b, ids in enumerate(batch["input_ids"].tolist()):
        for p in range(len(ids)):
            state = tuple(ids[1 : p + 1])
            if state in mdp.state_index:
                assert (logits[b, p, mdp.n_actions :] == NON_ACTION_LOGIT).all()
                torch.testing.assert_close(logits[b, p, : mdp.n_actions], ref.state_logits(state))
                # Non-action ids add exactly nothing to the LSE over the full vocabulary, in fp64 and fp32.
                for row in (logits[b, p], logits[b, p].float()):
                    assert torch.logsumexp(row, 0) == torch.logsumexp(row[: mdp.n_actions], 0)
            else:  # after an action that an observation follows, terminal, padding
                assert rows[b, p] == -1 and (logits[b, p] == 0).all()


def test_tabular_lm_fits_a_policy_through_forward():
    """Fitting every action position's logits row (row p − 1 for the token at p) to π*(·|s_p) recovers π* on every
    state."""
    mdp = random_mdp(4, vocab_size=3, horizon=3, stochastic_obs=True)
    soft = soft_optimal(mdp, 0.7)
    batch = make_batch(mdp)
    targets = torch.zeros(*batch["input_ids"].shape, mdp.n_tokens, dtype=torch.float64)
    for b, (y, _) in enumerate(mdp.trajectories()):
        for s, _ in mdp.steps(y):
            targets[b, len(s), : mdp.n_actions] = torch.from_numpy(soft.pi[s])
    model = TabularLM(mdp, init="zeros")
    optimizer = torch.optim.LBFGS(
        model.parameters(), max_iter=200, tolerance_grad=1e-12, tolerance_change=0, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        log_probs = model(batch["input_ids"]).logits.log_softmax(-1)
        loss = -(targets * log_probs).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert max_gap(model.policy(), soft.pi) < 1e-7


def test_tabular_lm_rejects_rows_without_bos():
    mdp = toy_mdp()
    with pytest.raises(ValueError, match="BOS"):
        TabularLM(mdp)(torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="init"):
        TabularLM(mdp, init="random")


# --- make_batch ------------------------------------------------------------------------------


def test_make_batch_on_the_toy():
    mdp = toy_mdp()
    batch = make_batch(mdp)
    trajectories = mdp.trajectories()
    assert batch["input_ids"].shape == (15, 5)
    assert (batch["input_ids"][:, 0] == mdp.bos_id).all() and not batch["act_mask"][:, 0].any()
    torch.testing.assert_close(batch["weights"], torch.tensor([p for _, p in trajectories], dtype=torch.float32))
    assert not batch["truncated"].any()
    for b, (y, _) in enumerate(trajectories):
        n = len(y)
        assert batch["input_ids"][b, 1 : n + 1].tolist() == list(y)
        assert batch["attention_mask"][b].tolist() == [1] * (n + 1) + [0] * (4 - n)
        assert batch["act_mask"][b].tolist() == [False] + [True] * n + [False] * (4 - n)
        assert batch["done"][b].nonzero().flatten().tolist() == [n]
        # The AB reward sits on the B that completes the bigram.
        ab = [p + 1 for p in range(1, n) if mdp.decode(y[p - 1 : p + 1]) == "A B"]
        assert batch["rewards"][b].nonzero().flatten().tolist() == ab
        for p, (s, a) in enumerate(mdp.steps(y), start=1):
            assert batch["ref_logp"][b, p].item() == pytest.approx(mdp.ref_log_probs(s)[a], abs=1e-6)
    # Sequence placement: the whole return on the last action token.
    seq_batch = make_batch(mdp.with_sequence_reward())
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(seq_batch["rewards"].sum(1), batch["rewards"].sum(1))
    torch.testing.assert_close(seq_batch["rewards"][torch.arange(15), last], batch["rewards"].sum(1))


def test_make_batch_truncated_rows():
    mdp = toy_mdp()
    prefixes = [mdp.encode("A"), mdp.encode("B A")]
    batch = make_batch(mdp, prefixes)
    assert batch["truncated"].all() and not batch["done"].any()
    assert batch["input_ids"].shape == (2, 4)
    for b, s in enumerate(prefixes):
        # The state after the last action has a position, and it carries LSE ℓ_ref(s) to bootstrap from.
        assert batch["ref_lse"][b, len(s) + 1].item() == pytest.approx(
            np.logaddexp.reduce(mdp.ref_logits[s]), abs=1e-6
        )
        assert batch["weights"][b].item() == pytest.approx(mdp.trajectory_prob(s), abs=1e-7)
    assert batch["weights"].tolist() == pytest.approx([0.5, 0.4 * 0.3])
    with pytest.raises(ValueError, match="neither"):
        make_batch(mdp, [mdp.encode("A EOS B")])


def test_make_batch_marks_observations_as_non_actions():
    mdp = random_mdp(1, vocab_size=3, horizon=3, stochastic_obs=True)
    batch = make_batch(mdp)
    ids = batch["input_ids"]
    is_obs = ids > mdp.bos_id
    assert is_obs.any()
    assert not batch["act_mask"][is_obs].any() and (batch["rewards"][is_obs] == 0).all()
    assert (batch["attention_mask"][is_obs] == 1).all()
    for b, (y, _) in enumerate(mdp.trajectories()):
        positions = [p for p in range(1, len(y) + 1) if y[p - 1] < mdp.n_actions]
        assert batch["act_mask"][b].nonzero().flatten().tolist() == positions
        for p, (s, a) in zip(positions, mdp.steps(y)):
            assert batch["rewards"][b, p].item() == pytest.approx(mdp.rewards[s][a], abs=1e-6)
    assert batch["weights"].sum().item() == pytest.approx(1, abs=1e-6)


def test_token_mdp_validation():
    mdp = toy_mdp()
    missing = dict(mdp.ref_logits)
    del missing[mdp.encode("A B")]
    with pytest.raises(ValueError, match="one entry per agent state"):
        TokenMDP(actions=mdp.actions, horizon=3, ref_logits=missing, rewards=mdp.rewards)
    with pytest.raises(ValueError, match="not a distribution"):
        TokenMDP(
            actions=mdp.actions,
            horizon=3,
            ref_logits=mdp.ref_logits,
            rewards=mdp.rewards,
            observations=("x",),
            obs_probs={(0,): [0.5]},
        )
    with pytest.raises(ValueError, match="eos"):
        TokenMDP(actions=("A", "B"), horizon=3, ref_logits={}, rewards={})
