"""DPO as inverse soft Q-learning reaches the exact fixed point (docs/algorithms.md §3, §8.5), matches TRL, and the
Q views agree (§7.1).

Population DPO — Bradley–Terry with the true reward over every pair of complete trajectories —
is fitted on a tabular LM with L-BFGS; its policy must be π* and its per-token implicit reward
β log π_θ/π_ref the optimal soft advantage A* from backward dynamic programming.  All
trajectories of these deterministic MDPs start at the root, as DPO's pairs must (§3.3).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmq.losses import dpo_loss, implicit_token_rewards, shiq_loss
from llmq.mdp import completion_mask, token_logprobs
from llmq.qfunctions import ImplicitQ, ShiftedLogits
from llmq.testing import TabularLM, make_batch, random_mdp, soft_optimal, toy_mdp


def minimise(model, objective):
    """Full-batch L-BFGS on a tabular model to the exact minimiser of ``objective()``."""
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
        loss = objective()
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)


def sequence_logps(model, batch):
    """``log π(y)``: the sum of the action tokens' log-probs of each row, ``[B]``."""
    logp, _ = token_logprobs(model(batch["input_ids"]).logits, batch["input_ids"])
    return torch.where(batch["act_mask"], logp, 0.0).sum(1)


def fit_population_dpo(mdp, beta, weighting):
    """Population DPO with soft Bradley–Terry labels ``σ(R_i − R_j)`` over every pair of complete trajectories.

    ``weighting="reference"``: each pair weighted by ``π_ref(y_i)·π_ref(y_j)`` (the expected
    log-likelihood of pairs sampled from π_ref); ``"uniform"``: the plain mean of :func:`dpo_loss`.
    Both have the same minimiser, where ``β log π_θ(y)/π_ref(y) = R(y) − V*(root)`` for every y.
    """
    batch = make_batch(mdp)
    model, reference = TabularLM(mdp), TabularLM.reference(mdp)
    returns = torch.tensor([mdp.trajectory_return(seq) for seq, _ in mdp.trajectories()], dtype=torch.float64)
    i, j = torch.triu_indices(len(returns), len(returns), offset=1)
    prefers_i = torch.sigmoid(returns[i] - returns[j])  # P(y_i ≻ y_j) under BT (§1.5)
    pair_weights = (batch["weights"][i] * batch["weights"][j]).double()
    ref_logps = sequence_logps(reference, batch)

    def objective():
        logps = sequence_logps(model, batch)
        if weighting == "uniform":
            return dpo_loss(logps[i], logps[j], ref_logps[i], ref_logps[j], beta=beta, label_smoothing=1 - prefers_i)[
                0
            ]
        h = beta * ((logps[i] - ref_logps[i]) - (logps[j] - ref_logps[j]))
        return -(pair_weights * (prefers_i * F.logsigmoid(h) + (1 - prefers_i) * F.logsigmoid(-h))).sum()

    minimise(model, objective)
    return model, reference, batch


def state_errors(mdp, model, reference, values, beta):
    """Max over states of |π_θ − π*| and of |β log π_θ/π_ref − A*| (action columns)."""
    policy_error = advantage_error = 0.0
    for s in mdp.states:
        implicit = (
            beta
            * (torch.log_softmax(model.state_logits(s), -1) - torch.log_softmax(reference.state_logits(s), -1))
            .detach()
            .numpy()
        )
        policy_error = max(policy_error, np.abs(model.policy_probs(s) - values.pi[s]).max())
        advantage_error = max(advantage_error, np.abs(implicit - (values.q[s] - values.v[s])).max())
    return policy_error, advantage_error


def trajectory_sum_error(mdp, model, reference, batch, values, beta):
    """Max over trajectories of |Σ_t r_θ(s_t, a_t) − (R(y) − V*(root))| (R2)."""
    logp, _ = token_logprobs(model(batch["input_ids"]).logits, batch["input_ids"])
    ref_logp, _ = token_logprobs(reference(batch["input_ids"]).logits, batch["input_ids"])
    sums = implicit_token_rewards(logp, ref_logp, batch["act_mask"], beta).sum(1).detach().numpy()
    returns = np.array([mdp.trajectory_return(seq) for seq, _ in mdp.trajectories()])
    return np.abs(sums - (returns - values.v[()])).max()


MDPS = {
    "toy": (toy_mdp, 0.5),
    "seed0-token": (lambda: random_mdp(0, vocab_size=3, horizon=3, reward_placement="token"), 1.0),
    "seed1-sequence": (lambda: random_mdp(1, vocab_size=4, horizon=3, reward_placement="sequence"), 0.5),
    "seed3-token": (lambda: random_mdp(3, vocab_size=5, horizon=2, reward_placement="token"), 2.0),
    "seed5-sequence": (lambda: random_mdp(5, vocab_size=3, horizon=4, reward_placement="sequence"), 0.7),
}


@pytest.mark.parametrize("weighting", ["reference", "uniform"])
@pytest.mark.parametrize("name", list(MDPS))
def test_population_dpo_recovers_pi_star_and_the_optimal_advantage(name, weighting):
    make_mdp, beta = MDPS[name]
    mdp = make_mdp()
    model, reference, batch = fit_population_dpo(mdp, beta, weighting)
    values = soft_optimal(mdp, beta)
    policy_error, advantage_error = state_errors(mdp, model, reference, values, beta)
    assert policy_error < 1e-4 and advantage_error < 1e-3, (policy_error, advantage_error)
    assert trajectory_sum_error(mdp, model, reference, batch, values, beta) < 1e-3
    if name == "toy":  # the A* column of docs/algorithms.md §8.3 (β = 0.5)
        root = beta * (
            torch.log_softmax(model.state_logits(()), -1) - torch.log_softmax(reference.state_logits(()), -1)
        )
        np.testing.assert_allclose(root.detach().numpy(), [0.190808, -0.185363, -0.596970], atol=1e-5)


def test_dpo_loss_by_hand():
    """Margin r_w − r_l = β·(log 6 − log 2) = log 3 at β = 1: σ = 3/4."""
    chosen, rejected, ref = torch.tensor([math.log(6.0)]), torch.tensor([math.log(2.0)]), torch.tensor([0.0])
    loss, metrics = dpo_loss(chosen, rejected, ref, ref, beta=1.0)
    assert loss.item() == pytest.approx(-math.log(0.75))
    assert metrics["rewards/margins"] == pytest.approx(math.log(3.0)) and metrics["rewards/accuracies"] == 1.0
    smoothed, _ = dpo_loss(chosen, rejected, ref, ref, beta=1.0, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(-0.8 * math.log(0.75) - 0.2 * math.log(0.25))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(chosen, rejected, ref, ref, beta=0.0)


def test_implicit_token_rewards_are_masked_and_sum_to_the_dpo_reward():
    logp, ref_logp = torch.tensor([[0.0, -1.0, -2.0, -3.0]]), torch.tensor([[0.0, -1.5, -1.0, -9.0]])
    act_mask = torch.tensor([[False, True, True, False]])
    rewards = implicit_token_rewards(logp, ref_logp, act_mask, beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.05, -0.1, 0.0]]))
    _, metrics = dpo_loss(
        torch.tensor([-3.0]), torch.tensor([0.0]), torch.tensor([-2.5]), torch.tensor([0.0]), beta=0.1
    )
    assert metrics["rewards/chosen"] == pytest.approx(rewards.sum().item())


# --- parity with TRL's DPOTrainer -----------------------------------------------------------------

PREFERENCES = {
    "prompt": ["The capital of France is", "2 + 2 =", "Name a colour:", "Say hi."],
    "chosen": [" Paris.", " 4", " blue", " Hi there!"],
    "rejected": [" Lyon, I think.", " 5", " a car", " No."],
}


def llmq_sequence_logps(model, tokenizer, prompts, completions):
    """``log π(completion | prompt)`` with llmq's helpers, tokenised the way TRL 1.16 does for plain-text rows.

    ``DPOTrainer._prepare_dataset`` appends the EOS string to a non-conversational completion
    that lacks it, tokenises ``prompt`` and ``prompt + completion`` (no special tokens are added
    by this tokenizer), and counts the tokens after their common prefix; the loss sums the
    log-probs of exactly those tokens (``completion_mask``).
    """
    rows, starts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids  # byte-level: the prompt is a token prefix
        rows.append(full_ids)
        starts.append(len(prompt_ids))
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    act_mask = completion_mask(attention_mask, torch.tensor(starts))
    with torch.no_grad():
        logp, _ = token_logprobs(model(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids)
    completions_ids = sorted(input_ids[b][act_mask[b]].tolist() for b in range(len(rows)))
    return torch.where(act_mask, logp, 0.0).sum(1), completions_ids


def test_dpo_loss_matches_trl_dpo_trainer(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from llmq.models import load_model, load_tokenizer

    beta = 0.1
    tokenizer = load_tokenizer("tiny-llama")
    policy, reference = load_model("tiny-llama", dtype="float32"), load_model("tiny-llama", dtype="float32")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, so rewards and margins are not all 0
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))

    chosen, chosen_ids = llmq_sequence_logps(policy, tokenizer, PREFERENCES["prompt"], PREFERENCES["chosen"])
    rejected, rejected_ids = llmq_sequence_logps(policy, tokenizer, PREFERENCES["prompt"], PREFERENCES["rejected"])
    ref_chosen, _ = llmq_sequence_logps(reference, tokenizer, PREFERENCES["prompt"], PREFERENCES["chosen"])
    ref_rejected, _ = llmq_sequence_logps(reference, tokenizer, PREFERENCES["prompt"], PREFERENCES["rejected"])
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)

    args = DPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        max_steps=1,
        logging_steps=1,
        beta=beta,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_dict(PREFERENCES),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))  # all 4 rows: [chosen rows; rejected rows]
    trl_completions = [
        row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True)
    ]
    assert sorted(trl_completions[:4]) == chosen_ids and sorted(trl_completions[4:]) == rejected_ids
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    trainer.log({})  # flushes the metrics of that batch into log_history
    logged = trainer.state.log_history[-1]

    assert abs(loss.item() - trl_loss.item()) < 1e-5
    assert 0 < metrics["rewards/accuracies"] < 1  # a batch where the accuracy metric is informative
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert logged[name] == pytest.approx(metrics[name].item(), rel=1e-6, abs=1e-5), (
            name
        )  # metrics are detached tensors


# --- Q-function views ---------------------------------------------------------------------------


def action_positions(mdp, batch):
    """``(row, position, state, action)`` of every action token of a :func:`make_batch` batch."""
    sequences = [seq for seq, _ in mdp.trajectories()]
    for b, p in batch["act_mask"].nonzero().tolist():
        yield b, p, sequences[b][: p - 1], sequences[b][p - 1]


def test_implicit_q_of_the_dpo_optimum_is_the_optimal_advantage():
    beta, mdp = 0.5, toy_mdp()
    model, reference, batch = fit_population_dpo(mdp, beta, "reference")
    values = soft_optimal(mdp, beta)
    view = ImplicitQ(model, reference, beta)
    q = view.q_values(batch["input_ids"], batch["attention_mask"])
    v = view.values(batch["input_ids"], batch["attention_mask"])
    advantages = view.advantages(batch["input_ids"], batch["attention_mask"])
    assert (
        q.shape == (*batch["input_ids"].shape, mdp.n_tokens)
        and v.shape == advantages.shape == batch["input_ids"].shape
    )
    for b, p, state, action in action_positions(mdp, batch):
        a_star = values.q[state] - values.v[state]
        np.testing.assert_allclose(q[b, p, : mdp.n_actions].numpy(), a_star, atol=1e-3)
        assert abs(advantages[b, p].item() - a_star[action]) < 1e-3 and v[b, p].item() == 0.0
        # V ≡ 0 is the soft value of this Q: β log Σ_a π_ref(a|s) exp(Q(s,a)/β) = 0 (B2).
        assert (
            abs(beta * np.logaddexp.reduce(mdp.ref_log_probs(state) + q[b, p, : mdp.n_actions].numpy() / beta)) < 1e-9
        )
    torch.testing.assert_close(q.gather(-1, batch["input_ids"][..., None]).squeeze(-1) - v, advantages)


def test_shifted_logits_of_the_shiq_optimum_are_q_star_and_v_star():
    beta, mdp = 0.5, toy_mdp()
    batch = make_batch(mdp)
    model, reference = TabularLM(mdp), TabularLM.reference(mdp)
    ref_logits = reference(batch["input_ids"]).logits
    common = dict(
        input_ids=batch["input_ids"], act_mask=batch["act_mask"], rewards=batch["rewards"], beta=beta, gamma=mdp.gamma
    )
    minimise(model, lambda: shiq_loss(model(batch["input_ids"]).logits, ref_logits, **common)[0])
    values = soft_optimal(mdp, beta)
    view = ShiftedLogits(model, reference, beta)
    q = view.q_values(batch["input_ids"], batch["attention_mask"])
    v = view.values(batch["input_ids"], batch["attention_mask"])
    advantages = view.advantages(batch["input_ids"], batch["attention_mask"])
    for b, p, state, action in action_positions(mdp, batch):
        np.testing.assert_allclose(q[b, p, : mdp.n_actions].numpy(), values.q[state], atol=1e-3)
        assert abs(v[b, p].item() - values.v[state]) < 1e-3
        assert abs(advantages[b, p].item() - (values.q[state][action] - values.v[state])) < 1e-3
    torch.testing.assert_close(q.gather(-1, batch["input_ids"][..., None]).squeeze(-1) - v, advantages)


def test_views_share_shapes_on_a_transformer_and_differ_by_the_value_shift(tiny_model_and_tokenizer):
    from llmq.models import load_model

    reference, tokenizer = tiny_model_and_tokenizer
    policy = load_model("tiny-llama", dtype="float32")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    encoded = tokenizer(["Hello there", "A longer second row"], padding=True, return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    shifted, implicit = ShiftedLogits(policy, reference, 0.1), ImplicitQ(policy, reference, 0.1)
    outputs = {}
    for name, view in (("shifted", shifted), ("implicit", implicit)):
        q, v, advantages = (
            view.q_values(input_ids, attention_mask),
            view.values(input_ids, attention_mask),
            view.advantages(input_ids, attention_mask),
        )
        assert q.shape == (*input_ids.shape, len(tokenizer)) and v.shape == advantages.shape == input_ids.shape
        assert q.dtype == v.dtype == advantages.dtype == torch.float32 and not q.requires_grad
        torch.testing.assert_close(q.gather(-1, input_ids[..., None]).squeeze(-1) - v, advantages)  # (B3)
        outputs[name] = q, v, advantages
    (q_shift, v_shift, a_shift), (q_implicit, _, a_implicit) = outputs["shifted"], outputs["implicit"]
    torch.testing.assert_close(q_implicit, q_shift - v_shift[..., None])  # the same models, another gauge
    torch.testing.assert_close(a_implicit, a_shift)
    assert a_shift[:, 1:].abs().max() > 0


def test_peft_reference_is_the_model_with_adapters_disabled():
    from peft import LoraConfig, get_peft_model

    from llmq.models import load_model

    reference = load_model("tiny-llama", dtype="float32")
    torch.manual_seed(0)  # init_lora_weights=False draws a non-zero adapter from the global generator
    model = get_peft_model(
        load_model("tiny-llama", dtype="float32"),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    implicit_reference = ImplicitQ(model, None, 0.1).advantages(input_ids)
    torch.testing.assert_close(implicit_reference, ImplicitQ(model, reference, 0.1).advantages(input_ids))
    assert implicit_reference[:, 1:].abs().max() > 0
    with pytest.raises(ValueError, match="PEFT"):
        ImplicitQ(reference, None, 0.1)
