"""Digi-Q's critic and Best-of-N extraction against the exact oracle (docs/algorithms.md §5.5, §5.9, §8.5).

Tabular features (one-hot states, one-hot state-action pairs) with linear heads make fitted TD
evaluation exact: with π_b = π_ref the critic must reach Q^{π_ref}, V^{π_ref}; with an expectile
V it must reach the expectile fixed points that §8.5 prints for the toy MDP.
"""

import numpy as np
import pytest
import torch

from llmq.losses import best_of_n_advantages, td_loss
from llmq.models.value_heads import CriticHeads, DigiQCritic
from llmq.testing import evaluate, random_mdp, toy_mdp


def transitions(mdp):
    """Every (s, a) of the MDP with π_ref(a|s) > 0 as one-hot features, reward, next state, done, weight π_ref(a|s)."""
    states = list(mdp.states)
    pairs = [(s, a) for s in states for a in range(mdp.n_actions) if mdp.reference_policy[s][a] > 0]
    state_row = {s: i for i, s in enumerate(states)}
    rows = []
    for s, a in pairs:
        [(nxt, _)] = mdp.transitions(s, a)
        done = mdp.is_terminal(nxt)
        rows.append(
            (
                state_row[s],
                pairs.index((s, a)),
                mdp.rewards[s][a],
                -1 if done else state_row[nxt],
                done,
                mdp.reference_policy[s][a],
            )
        )
    eye_s, eye_sa = torch.eye(len(states), dtype=torch.float64), torch.eye(len(pairs), dtype=torch.float64)
    state = eye_s[[r[0] for r in rows]]
    action = eye_sa[[r[1] for r in rows]]
    next_state = torch.stack(
        [eye_s[r[3]] if r[3] >= 0 else torch.zeros(len(states), dtype=torch.float64) for r in rows]
    )
    tensor = lambda i: torch.tensor([r[i] for r in rows], dtype=torch.float64)  # noqa: E731
    return (
        states,
        pairs,
        dict(state=state, action=action, next_state=next_state, reward=tensor(2), done=tensor(4), weight=tensor(5)),
    )


def fit_critic(mdp, expectile=None, num_heads=2):
    states, pairs, data = transitions(mdp)
    critic = fitted_evaluation(data, mdp.gamma, 3 * mdp.horizon + 6, expectile, num_heads)
    return critic, states, pairs, data


def fitted_evaluation(data, gamma, iterations, expectile=None, num_heads=2):
    """Fit the online heads to the TD targets exactly (L-BFGS), copy them to the target, repeat ``iterations``
    times; ``data`` holds one-hot ``state``/``action``/``next_state`` features, ``reward``, ``done`` and ``weight``."""
    torch.manual_seed(0)
    critic = DigiQCritic(
        CriticHeads(data["state"].shape[1], data["action"].shape[1], num_layers=0, num_heads=num_heads).double()
    )
    for _ in range(iterations):
        with torch.no_grad():
            target_q = critic.target.q(data["state"], data["action"])
            target_v_next = critic.target.v(data["next_state"])
        optimizer = torch.optim.LBFGS(
            critic.online.parameters(),
            lr=1,
            max_iter=500,
            tolerance_grad=1e-12,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )

        def closure(optimizer=optimizer, target_q=target_q, target_v_next=target_v_next):  # bound to this iteration
            optimizer.zero_grad()
            loss, _ = td_loss(
                critic.online.q(data["state"], data["action"]),
                critic.online.v(data["state"]),
                target_q=target_q,
                target_v_next=target_v_next,
                rewards=data["reward"],
                dones=data["done"],
                gamma=gamma,
                expectile=expectile,
                weights=data["weight"],
            )
            loss.backward()
            return loss

        optimizer.step(closure)
        critic.update_target(1.0)
    return critic


MDPS = [
    ("toy", toy_mdp()),
    ("random-0", random_mdp(0, vocab_size=3, horizon=3)),
    ("random-1-gamma0.9", random_mdp(1, vocab_size=4, horizon=3, gamma=0.9)),
    ("random-2-sequence", random_mdp(2, vocab_size=3, horizon=4, reward_placement="sequence")),
]


@pytest.mark.parametrize(("name", "mdp"), MDPS, ids=[m[0] for m in MDPS])
def test_td_on_logged_actions_converges_to_the_behaviour_values(name, mdp):
    critic, states, pairs, data = fit_critic(mdp)
    oracle = evaluate(mdp)  # Q^{π_ref}, V^{π_ref}
    with torch.no_grad():
        q, v = (
            critic.online.q(data["state"], data["action"]),
            critic.online.v(torch.eye(len(states), dtype=torch.float64)),
        )
    for head in range(2):
        np.testing.assert_allclose(q[head].numpy(), [oracle.q[s][a] for s, a in pairs], atol=1e-3)
        np.testing.assert_allclose(v[head].numpy(), [oracle.v[s] for s in states], atol=1e-3)


@pytest.mark.parametrize(("expectile", "root_value"), [(0.5, None), (0.7, 0.6255), (0.9, 0.8887)])
def test_expectile_value_reaches_the_printed_toy_fixed_points(expectile, root_value):
    """§8.5: τ = 0.5 is plain evaluation; τ = 0.7 and 0.9 give V(root) = 0.6255 and 0.8887."""
    mdp = toy_mdp()
    critic, states, _, _ = fit_critic(mdp, expectile=expectile, num_heads=1)
    with torch.no_grad():
        v = critic.online.v(torch.eye(len(states), dtype=torch.float64))[0]
    root = v[states.index(())].item()
    expected = evaluate(mdp).v[()] if root_value is None else root_value
    assert root == pytest.approx(expected, abs=1e-4 if root_value is None else 5e-5)


def test_best_of_n_extraction_on_exact_values_picks_the_oracle_best_actions():
    """§5.9: root advantages (0.24, −0.16, −0.36), state A (−0.1, 0.4, −0.6): the extracted policy writes "A B" (return
    1)."""
    mdp = toy_mdp()
    critic, states, pairs, _ = fit_critic(mdp)
    eye_s, eye_sa = torch.eye(len(states), dtype=torch.float64), torch.eye(len(pairs), dtype=torch.float64)
    oracle = evaluate(mdp)
    for state, expected in [((), (0.24, -0.16, -0.36)), (mdp.encode("A"), (-0.1, 0.4, -0.6))]:
        candidates = torch.stack([eye_sa[pairs.index((state, a))] for a in range(mdp.n_actions)])[None]
        with torch.no_grad():
            q = critic.online.q(eye_s[[states.index(state)]], candidates)
            v = critic.online.v(eye_s[[states.index(state)]])
        best, advantage, weight = best_of_n_advantages(q, v, threshold=0.1)
        exact = oracle.q[state] - oracle.v[state]
        np.testing.assert_allclose((q.max(0).values - v.max(0).values[:, None])[0].numpy(), exact, atol=1e-3)
        np.testing.assert_allclose(exact, expected, atol=5e-3)
        assert best.item() == int(np.argmax(expected)) and weight.item() == 1.0
    assert mdp.trajectory_return(mdp.encode("A B")) == 1.0
    # a threshold above the best advantage imitates nothing
    assert best_of_n_advantages(q, v, threshold=0.5)[2].item() == 0.0


def test_invalid_candidates_get_zero_advantage():
    q = torch.tensor([[[1.0, 3.0]], [[0.5, 2.0]]])  # [H=2, B=1, N=2]
    v = torch.tensor([[0.5], [1.0]])
    best, advantage, weight = best_of_n_advantages(q, v, threshold=0.0, valid=torch.tensor([[True, False]]))
    assert best.item() == 0 and advantage.item() == pytest.approx(0.0) and weight.item() == 0.0


def test_td_loss_is_zero_at_the_fixed_point_and_checks_expectile():
    q = torch.tensor([[1.0, 0.5]])
    v = torch.tensor([[0.8, 0.2]])
    loss, metrics = td_loss(
        q,
        v,
        target_q=torch.tensor([[0.8, 0.2]]),
        target_v_next=torch.tensor([[1.0, 9.0]]),
        rewards=torch.tensor([0.0, 0.5]),
        dones=torch.tensor([0.0, 1.0]),
        gamma=1.0,
    )
    assert loss.item() == 0.0 and metrics["td_error/abs_mean"].item() == 0.0
    with pytest.raises(ValueError, match="expectile"):
        td_loss(
            q, v, target_q=q, target_v_next=v, rewards=torch.zeros(2), dones=torch.zeros(2), gamma=1.0, expectile=1.5
        )


def test_the_trainer_fits_the_behaviour_values_with_polyak_targets(tmp_path):
    """CriticTrainer (Adam, Polyak targets, linear heads) on the toy MDP's weighted transitions."""
    import datasets

    from llmq.trainers.critic import CriticConfig, CriticTrainer

    mdp = toy_mdp()
    states, pairs, data = transitions(mdp)
    rows = [
        {
            "state_features": data["state"][i].tolist(),
            "action_features": data["action"][i].tolist(),
            "next_state_features": data["next_state"][i].tolist(),
            "reward": float(data["reward"][i]),
            "done": bool(data["done"][i]),
            "weight": float(data["weight"][i]),
        }
        for i in range(len(pairs))
    ]
    args = CriticConfig(
        output_dir=str(tmp_path),
        gamma=mdp.gamma,
        num_layers=0,
        learning_rate=0.05,
        max_steps=800,
        per_device_train_batch_size=len(rows),
        target_update_rate=0.5,
        target_update_steps=10,
        max_grad_norm=10.0,
        report_to="none",
        save_strategy="no",
        logging_steps=50,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = CriticTrainer(args=args, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    critic = trainer.model.cpu()
    oracle = evaluate(mdp)
    with torch.no_grad():
        q = critic.online.q(data["state"].float(), data["action"].float())
        v = critic.online.v(torch.eye(len(states)))
    np.testing.assert_allclose(q.numpy(), np.tile([oracle.q[s][a] for s, a in pairs], (2, 1)), atol=2e-3)
    np.testing.assert_allclose(v.numpy(), np.tile([oracle.v[s] for s in states], (2, 1)), atol=2e-3)
    logged = [entry for entry in trainer.state.log_history if "td_error/abs_mean" in entry]
    assert logged and logged[-1]["td_error/abs_mean"] < logged[0]["td_error/abs_mean"]


def test_a_critics_heads_start_from_its_seed_whatever_ran_before(tmp_path):
    """Two trainers with the same seed build the same heads, even when other code drew random numbers in between (a
    representation fine-tuning, an earlier fold's critic): a critic fit is reproducible from its config alone."""
    import datasets

    from llmq.trainers.critic import CriticConfig, CriticTrainer

    rows = [
        {"state_features": [1.0, 0.0], "action_features": [0.0, 1.0], "next_state_features": [0.0, 0.0], "reward": 1.0}
        | {"done": True}
    ]
    args = CriticConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, seed=3)
    first = CriticTrainer(args=args, train_dataset=datasets.Dataset.from_list(rows)).model
    torch.rand(1000)
    second = CriticTrainer(args=args, train_dataset=datasets.Dataset.from_list(rows)).model
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = CriticTrainer(
        args=CriticConfig(**{**args.to_dict(), "seed": 4}), train_dataset=datasets.Dataset.from_list(rows)
    )
    assert not torch.equal(first.online.q_heads[0][0].weight, other.model.online.q_heads[0][0].weight)


class OneHotFeatures:
    """Tabular features for :func:`llmq.methods.digiq.critic_transitions`: one column per state text, including states
    only ever reached (never logged), and one per (state, command)."""

    def __init__(self, rows):
        self.states = sorted({r["state"] for r in rows} | {r["next_state"] for r in rows})
        self.pairs = sorted({(r["state"], r["action"]) for r in rows})

    def state(self, text):
        return torch.eye(len(self.states), dtype=torch.float64)[self.states.index(text)].tolist()

    def action(self, text, command):
        return torch.eye(len(self.pairs), dtype=torch.float64)[self.pairs.index((text, command))].tolist()


def step_limited_chain(seed, length=5, step_limit=6, gamma=0.95, step_cost=0.05):
    """A chain game: from cell 0, "right" moves up one cell, "left" down one (not below 0); reaching cell ``length``
    wins (+1) and ends the game, every other step costs ``step_cost``, and the game ends after ``step_limit`` steps.
    The state text holds the step count (as TextWorld's holds every previous command), so the state after the last
    step is never a logged state.  The behaviour policy's probability of "right" is drawn per state.

    Returns every reachable (state, command) as a Digi-Q data row (``done``/``truncated`` set as
    :class:`~llmq.envs.textworld.TextWorldEnv` sets them), its behaviour probability, and the exact Q^{π_b} of the
    limited game by backward induction."""
    rng = np.random.default_rng(seed)
    text = lambda cell, step: f"cell {cell} after {step} steps"  # noqa: E731
    reachable = {0: {0}}
    for step in range(1, step_limit):
        reachable[step] = {min(max(c + d, 0), length) for c in reachable[step - 1] if c < length for d in (-1, 1)}
    right = {(c, t): rng.uniform(0.2, 0.8) for t in reachable for c in reachable[t] if c < length}
    q, v = {}, {}
    for t in reversed(range(step_limit)):
        for c in sorted(reachable[t]):
            if c == length:
                continue
            for command, move in (("left", -1), ("right", 1)):
                nxt = min(max(c + move, 0), length)
                won = nxt == length
                reward = 1.0 if won else -step_cost
                out_of_steps = t + 1 == step_limit
                q[(c, t, command)] = reward + (0.0 if won or out_of_steps else gamma * v[(nxt, t + 1)])
            v[(c, t)] = right[(c, t)] * q[(c, t, "right")] + (1 - right[(c, t)]) * q[(c, t, "left")]
    rows, weights, exact = [], [], []
    for (c, t, command), value in q.items():
        nxt = min(max(c + (1 if command == "right" else -1), 0), length)
        won, out_of_steps = nxt == length, t + 1 == step_limit
        rows.append(
            {
                "state": text(c, t),
                "action": command,
                "reward": 1.0 if won else -step_cost,
                "next_state": text(nxt, t + 1),
                "done": won or out_of_steps,
                "truncated": out_of_steps and not won,
                "admissible": ["left", "right"],
            }
        )
        weights.append(right[(c, t)] if command == "right" else 1 - right[(c, t)])
        exact.append(value)
    return rows, weights, exact


def critic_q_on_rows(rows, weights, gamma, iterations):
    """Fitted evaluation of the critic on the rows as :func:`critic_transitions` presents them; its Q on every row."""
    import datasets

    from llmq.methods.digiq import critic_transitions

    transitions = critic_transitions(OneHotFeatures(rows), datasets.Dataset.from_list(rows))
    as_tensor = lambda key: torch.tensor([t[key] for t in transitions], dtype=torch.float64)  # noqa: E731
    data = {
        "state": as_tensor("state_features"),
        "action": as_tensor("action_features"),
        "next_state": as_tensor("next_state_features"),
        "reward": as_tensor("reward"),
        "done": as_tensor("done"),
        "weight": torch.tensor(weights, dtype=torch.float64),
    }
    critic = fitted_evaluation(data, gamma, iterations)
    with torch.no_grad():
        return critic.online.q(data["state"], data["action"])


@pytest.mark.parametrize("seed", range(3))
def test_a_spent_step_budget_is_terminal_for_the_critic(seed):
    """Running out of steps ends the game: the critic gets Q^{π_b} of the step-limited game, which bootstrapping from
    the never-trained state after the last step would not."""
    rows, weights, exact = step_limited_chain(seed)
    q = critic_q_on_rows(rows, weights, gamma=0.95, iterations=12)
    for head in range(2):
        np.testing.assert_allclose(q[head].numpy(), exact, atol=1e-3)


def test_data_cut_short_of_the_games_end_bootstraps_from_the_next_logged_state():
    """A transition whose episode the data cuts (done and truncated, the game not over) while its next state is logged
    elsewhere bootstraps: Q still reaches the game's Q^{π_b}."""
    rows, weights, exact = step_limited_chain(0)
    logged = {r["state"] for r in rows}
    cut = [i for i, r in enumerate(rows) if not r["done"] and r["next_state"] in logged][::3]
    assert len(cut) >= 3
    for i in cut:
        rows[i] |= {"done": True, "truncated": True}
    q = critic_q_on_rows(rows, weights, gamma=0.95, iterations=12)
    np.testing.assert_allclose(q[0].numpy(), exact, atol=1e-3)


def test_polyak_moves_each_target_parameter_by_the_rate_towards_the_online_one():
    critic = DigiQCritic(CriticHeads(3, 2, hidden_size=4, num_layers=1))
    with torch.no_grad():
        for parameter in critic.target.parameters():
            parameter.fill_(1.0)
        for parameter in critic.online.parameters():
            parameter.fill_(11.0)
    critic.update_target(0.2)
    for target, online in zip(critic.target.parameters(), critic.online.parameters()):
        assert torch.all(target == 3.0) and torch.all(online == 11.0)  # 0.8·1 + 0.2·11


def test_the_critic_trainers_loss_uses_each_heads_own_target_chain(tmp_path):
    """Online and target heads all differ; the loss must be the one of hand-computed targets: y_Q,i = r + γ(1 − done)
    V̄_i(s'), y_V,i = Q̄_i(s, a) — not the online heads, not the other head's chain."""
    from llmq.trainers.critic import CriticConfig, CriticTrainer

    args = CriticConfig(
        output_dir=str(tmp_path), gamma=0.5, num_layers=0, report_to="none", use_cpu=True, save_strategy="no"
    )
    trainer = CriticTrainer(
        args=args,
        train_dataset=[
            {"state_features": [1.0], "action_features": [1.0], "next_state_features": [1.0], "reward": 0.0}
        ],
    )
    critic = trainer.model
    # linear heads on one state and one action feature: Q = w_s·s + w_a·a + b, V = w·s + b
    weights = {
        ("online", "q", 0): ([1.0, 2.0], 0.0),
        ("online", "q", 1): ([3.0, -1.0], 0.5),
        ("online", "v", 0): ([2.0], 0.0),
        ("online", "v", 1): ([-1.0], 1.0),
        ("target", "q", 0): ([0.5, 0.5], 1.0),
        ("target", "q", 1): ([-2.0, 1.0], 0.0),
        ("target", "v", 0): ([4.0], -1.0),
        ("target", "v", 1): ([1.0], 2.0),
    }
    with torch.no_grad():
        for (side, kind, i), (w, b) in weights.items():
            layer = getattr(getattr(critic, side), f"{kind}_heads")[i][0]
            layer.weight.copy_(torch.tensor([w]))
            layer.bias.fill_(b)
    s, a, s_next, r = 1.0, 2.0, 3.0, 0.25
    inputs = {
        "state_features": torch.tensor([[s]]),
        "action_features": torch.tensor([[a]]),
        "next_state_features": torch.tensor([[s_next]]),
        "reward": torch.tensor([r]),
        "done": torch.tensor([0.0]),
    }
    q = [1 * s + 2 * a, 3 * s - a + 0.5]  # online: 5.0, 1.5
    v = [2 * s, -s + 1]  # online: 2.0, 0.0
    target_q = [0.5 * s + 0.5 * a + 1, -2 * s + a]  # 2.5, 0.0
    target_v_next = [4 * s_next - 1, s_next + 2]  # 11.0, 5.0
    expected = sum((r + 0.5 * target_v_next[i] - q[i]) ** 2 + (target_q[i] - v[i]) ** 2 for i in range(2))
    assert trainer.compute_loss(critic, inputs).item() == pytest.approx(expected)  # 0.5625 + 0.25 + 1.5625 + 0


def test_best_of_n_takes_the_optimistic_head_for_q_and_for_v():
    """Heads that disagree: A_j = max_i Q_i(s, a_j) − max_i V_i(s) = (2, 3) − 1.5; min over heads would pick the other
    candidate."""
    q = torch.tensor([[[1.0, 3.0]], [[2.0, 0.0]]])  # [H=2, B=1, N=2]
    v = torch.tensor([[0.5], [1.5]])
    best, advantage, weight = best_of_n_advantages(q, v, threshold=1.0)
    assert best.item() == 1 and advantage.item() == pytest.approx(1.5) and weight.item() == 1.0
    best, advantage, _ = best_of_n_advantages(q, v, threshold=1.0, valid=torch.tensor([[True, False]]))
    assert best.item() == 0 and advantage.item() == pytest.approx(0.5)
