"""Online ShiQ (sample → buffer → replayed updates) reaches the exact KL-regularised optimum π* on finite token MDPs.

The real :class:`OnlineTrainer` runs its rounds on a tabular LM; the rollout samples trajectories exactly from
the tabular policy (or from an old policy), so the only approximation is the optimisation itself.
"""

import numpy as np
import pytest

from llmq.testing import TabularLM, make_batch, random_mdp, soft_optimal, toy_mdp
from llmq.trainers.online import OnlineConfig, OnlineTrainer, RoundSamples

PROMPTS, COMPLETIONS = 8, 4


def tabular_rollout(mdp, sampler, seed):
    """Round r: PROMPTS × COMPLETIONS trajectories drawn from ``sampler.policy()`` (a TabularLM)."""

    def rollout(round_index, model):
        sequences = mdp.sample(sampler.policy(), PROMPTS * COMPLETIONS, np.random.default_rng([seed, round_index]))
        batch = make_batch(mdp, sequences)
        rows = []
        for i, sequence in enumerate(sequences):
            length = len(sequence) + 1  # BOS, then the trajectory
            rows.append(
                {
                    "input_ids": batch["input_ids"][i, :length].tolist(),
                    "act_mask": batch["act_mask"][i, :length].int().tolist(),
                    "rewards": batch["rewards"][i, :length].tolist(),
                    "truncated": False,
                    "group": i // COMPLETIONS,
                    "reward": mdp.collected_reward(sequence),
                }
            )
        return RoundSamples(rows=rows, sampled_tokens=sum(len(s) for s in sequences))

    return rollout


def train_online(mdp, beta, tmp_path, replay_fraction=0.5, sample_from_initial_policy=False, rounds=40, seed=0):
    model, trainer = online_trainer(mdp, beta, tmp_path, replay_fraction, sample_from_initial_policy, rounds, seed)
    trainer.train()
    return model, trainer


def online_trainer(mdp, beta, tmp_path, replay_fraction=0.5, sample_from_initial_policy=False, rounds=40, seed=0):
    model = TabularLM(mdp)
    sampler = TabularLM(mdp) if sample_from_initial_policy else model  # an old policy that never moves
    args = OnlineConfig(
        output_dir=str(tmp_path),
        objective="shiq",
        beta=beta,
        gamma=mdp.gamma,
        rounds=rounds,
        prompts_per_round=PROMPTS,
        completions_per_prompt=COMPLETIONS,
        updates_per_round=40,
        per_device_train_batch_size=16,
        replay_fraction=replay_fraction,
        buffer_capacity=512,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        max_grad_norm=0.0,
        weight_decay=0.0,
        seed=seed,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_total_limit=1,
    )
    trainer = OnlineTrainer(
        model, args, tabular_rollout(mdp, sampler, seed), pad_token_id=mdp.eos_id, ref_model=TabularLM.reference(mdp)
    )
    return model, trainer


def test_sampled_rows_get_the_references_exact_statistics_wherever_the_loss_reads_them(tmp_path):
    """Each new row is scored once by the reference, at its action positions and, when it is truncated, at the state
    after its last action. Rows cut at every agent state: the longest truncated ones bootstrap from a position that is
    no row's action, so only their truncation gets it scored."""
    mdp = random_mdp(1, vocab_size=3, horizon=3)
    _, trainer = online_trainer(mdp, 0.5, tmp_path)
    batch = make_batch(mdp, [state for state in mdp.states if state])
    rows = []
    for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        rows.append(
            {
                "input_ids": batch["input_ids"][i, :length].tolist(),
                "act_mask": batch["act_mask"][i, :length].int().tolist(),
                "rewards": batch["rewards"][i, :length].tolist(),
                "truncated": bool(batch["truncated"][i]),
            }
        )
    assert sum(row["truncated"] for row in rows) > 1
    for i, row in enumerate(trainer._with_reference_statistics(rows)):
        actions = [p for p, acted in enumerate(row["act_mask"]) if acted]
        read = actions + ([actions[-1] + 1] if row["truncated"] else [])
        assert len(row["ref_logp"]) == len(row["ref_lse"]) == len(row["input_ids"]) + 1
        np.testing.assert_allclose([row["ref_logp"][p] for p in actions], batch["ref_logp"][i, actions], atol=1e-6)
        np.testing.assert_allclose([row["ref_lse"][p] for p in read], batch["ref_lse"][i, read], atol=1e-6)


def policy_error(mdp, model, beta):
    """Max |π_θ − π*| over the agent states."""
    optimum = soft_optimal(mdp, beta).pi
    return max(np.abs(model.policy_probs(state) - optimum[state]).max() for state in mdp.states)


def test_online_shiq_reaches_pi_star_on_the_toy_mdp(tmp_path):
    model, trainer = train_online(toy_mdp(), 0.5, tmp_path)
    assert policy_error(toy_mdp(), model, 0.5) < 1e-3
    assert trainer.log[-1]["buffer_rows"] == 512 and trainer.log[-1]["buffer_age_max"] > 1


def coverage(mdp, policy):
    """The least probability, under ``policy``, of visiting a state and taking a given action there."""
    return min(mdp.trajectory_prob(s, policy) * policy[s][a] for s in mdp.states for a in range(mdp.n_actions))


@pytest.mark.parametrize(
    "seed, vocab_size, horizon, beta, gamma",
    [(0, 2, 4, 1.0, 0.9), (5, 2, 4, 1.0, 0.9), (2, 3, 3, 2.0, 1.0)],
)
def test_online_shiq_reaches_pi_star_on_seeded_random_mdps_mostly_from_replayed_samples(
    tmp_path, seed, vocab_size, horizon, beta, gamma
):
    """π* is pinned down only at the (state, action) pairs the samples contain (a pair never sampled leaves its
    logit free): these MDPs give every pair a probability of at least 0.004 under π_ref and under π*."""
    mdp = random_mdp(seed, vocab_size=vocab_size, horizon=horizon, gamma=gamma)
    assert min(coverage(mdp, mdp.reference_policy), coverage(mdp, soft_optimal(mdp, beta).pi)) > 0.004
    model, _ = train_online(mdp, beta, tmp_path, replay_fraction=0.75, seed=seed)
    assert policy_error(mdp, model, beta) < 1e-3


def test_updates_made_only_of_samples_of_the_initial_policy_reach_pi_star(tmp_path):
    """Off-policy: the rollout never follows the learner, and every update after the first round replays."""
    mdp = random_mdp(1, vocab_size=3, horizon=3)
    model, _ = train_online(mdp, 0.5, tmp_path, replay_fraction=1.0, sample_from_initial_policy=True)
    assert policy_error(mdp, model, 0.5) < 1e-3
