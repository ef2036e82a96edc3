"""Q* A* search on the oracle MDP: with the exact Q_hard it returns a maximal-return sequence;
budget, depth and dedup are respected (docs/algorithms.md §4.9)."""

import functools

import numpy as np
import pytest

from llmq.decoding.qstar import astar_search
from llmq.errors import UserError
from llmq.testing import hard_optimal, random_mdp, toy_mdp


def oracle_callables(mdp):
    q_hard = hard_optimal(mdp).q

    def propose(states, k):
        return [[a for a in range(mdp.n_actions) if mdp.reference_policy[s][a] > 0][:k] for s in states]

    def q_values(pairs):
        return [float(q_hard[s][a]) for s, a in pairs]

    return propose, q_values


def best_return(mdp):
    return max(mdp.trajectory_return(seq) for seq, p in mdp.trajectories() if p > 0)


MDPS = [("toy-seq", toy_mdp().with_sequence_reward())] + [
    (f"random-{seed}-seq", random_mdp(seed, vocab_size=3, horizon=4, reward_placement="sequence")) for seed in range(4)
]


@pytest.mark.parametrize("heuristic", ["inherited", "child"])
@pytest.mark.parametrize(("name", "mdp"), MDPS, ids=[m[0] for m in MDPS])
def test_either_heuristic_with_exact_q_hard_and_outcome_rewards_finds_a_best_sequence(name, mdp, heuristic):
    propose, q_values = oracle_callables(mdp)
    result = astar_search(
        propose=propose,
        q_values=q_values,
        is_terminal=mdp.is_terminal,
        num_candidates=mdp.n_actions,
        budget=100,
        max_depth=mdp.horizon,
        heuristic=heuristic,
    )
    assert result.best.terminal and not result.budget_exhausted
    assert mdp.trajectory_return(result.best.state) == pytest.approx(best_return(mdp), abs=1e-12)
    assert result.best.f == pytest.approx(best_return(mdp), abs=1e-12)  # f of a terminal = its return
    assert [n.state for n in result.path()] == [result.best.state[:i] for i in range(len(result.best.state) + 1)]


UTILITY_RANGES = {"min": (-1.0, 1.0), "last": (-1.0, 1.0), "sum": (-1.0, 0.0)}  # sum: penalties, utilities <= 0


def random_utilities(mdp, seed, low, high):
    """A process utility R_P per (state, step) of ``mdp``, independent of its rewards (a PRM or rules)."""
    rng = np.random.default_rng(seed)
    table = {s: rng.uniform(low, high, mdp.n_actions) for s in mdp.rewards}
    return lambda state: float(table[state[:-1]][state[-1]])


@functools.cache
def random_mdp_with_oracle(seed):
    """A seeded random MDP with outcome rewards, its exact-Q callables and its possible answers (shared by the
    eight compositions)."""
    mdp = random_mdp(seed, vocab_size=3, horizon=4, reward_placement="sequence")
    return mdp, *oracle_callables(mdp), [seq for seq, p in mdp.trajectories() if p > 0]


def search_one_random_mdp(seed, aggregate, heuristic):
    mdp, propose, q_values, answers = random_mdp_with_oracle(seed)
    asked = []

    def counted(states, k):
        asked.extend(states)
        return propose(states, k)

    if aggregate == "zero":
        utility, utility_max, combine = None, None, lambda scores: 0.0
    else:
        low, high = UTILITY_RANGES[aggregate]
        utility, utility_max = random_utilities(mdp, 1000 + seed, low, high), high
        combine = {"sum": sum, "min": min, "last": lambda scores: scores[-1]}[aggregate]
    lam = (0.5, 1.0, 2.0)[seed % 3]

    def objective(seq):
        process = combine([utility(seq[: t + 1]) for t in range(len(seq))]) if utility else 0.0
        return process + lam * mdp.trajectory_return(seq)

    best = max(objective(seq) for seq in answers)
    result = astar_search(
        propose=counted,
        q_values=q_values,
        is_terminal=mdp.is_terminal,
        num_candidates=mdp.n_actions,
        budget=1000,
        max_depth=mdp.horizon,
        lam=lam,
        aggregate=aggregate,
        utility=utility,
        utility_max=utility_max,
        heuristic=heuristic,
    )
    assert result.best.terminal and not result.budget_exhausted, seed
    assert objective(result.best.state) == pytest.approx(best, abs=1e-9), seed
    assert result.best.f == pytest.approx(best, abs=1e-9), seed
    assert len(asked) == len(set(asked)), seed
    assert {node.state for node in result.nodes if node.expanded} <= set(asked), seed


@pytest.mark.parametrize("heuristic", ["inherited", "child"])
@pytest.mark.parametrize("aggregate", ["zero", "sum", "min", "last"])
def test_every_composition_returns_an_answer_maximising_aggregated_utility_plus_lambda_outcome(aggregate, heuristic):
    """J(τ) = Agg(R_P(s_1..s_T)) + λ·R(τ), R the outcome that the exact Q_hard values, over 200 seeded random
    MDPs and three λ: the first final state popped maximises J, and its f is its J. Token accounting: no state is
    proposed twice (the child heuristic's proposals are the child's candidates when it is expanded)."""
    for seed in range(200):
        search_one_random_mdp(seed, aggregate, heuristic)


def test_budget_depth_and_dedup_are_respected():
    mdp = random_mdp(1, vocab_size=3, horizon=4, reward_placement="sequence")
    propose, q_values = oracle_callables(mdp)
    result = astar_search(
        propose=propose, q_values=q_values, is_terminal=mdp.is_terminal, num_candidates=3, budget=2, max_depth=4
    )
    assert result.expansions == 2 and result.budget_exhausted and sum(n.expanded for n in result.nodes) == 2
    shallow = astar_search(
        propose=lambda states, k: [list(range(k))] * len(states),
        q_values=lambda pairs: [float(len(s)) for s, _ in pairs],
        is_terminal=lambda s: False,
        num_candidates=3,
        budget=50,
        max_depth=2,
    )
    assert max(n.depth for n in shallow.nodes) == 2 and all(not n.expanded for n in shallow.nodes if n.depth == 2)
    duplicates = astar_search(
        propose=lambda states, k: [[0, 0, 1]] * len(states),
        q_values=lambda pairs: [0.0] * len(pairs),
        is_terminal=lambda s: len(s) == 2,
        num_candidates=3,
        budget=10,
        max_depth=3,
    )
    states = [n.state for n in duplicates.nodes]
    assert len(states) == len(set(states))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"aggregate": "min"}, "needs a utility"),
        ({"lam": 0}, "lam must be > 0"),
        ({"aggregate": "mean"}, "aggregate"),
        ({"utility": lambda s: 0.0}, "needs an aggregate"),
        ({"aggregate": "sum", "utility": lambda s: 0.5, "utility_max": 1.0}, "utilities <= 0"),
        ({"aggregate": "sum", "utility": lambda s: -0.5}, "utilities <= 0"),
        ({"aggregate": "last", "utility": lambda s: 0.5}, "needs utility_max"),
    ],
)
def test_bad_settings_are_refused(setting, message):
    propose, q_values = oracle_callables(toy_mdp())
    with pytest.raises(ValueError, match=message):
        astar_search(
            propose=propose,
            q_values=q_values,
            is_terminal=lambda s: True,
            num_candidates=2,
            budget=1,
            max_depth=1,
            **setting,
        )


def test_llm_proposer_and_feature_qvm_drive_a_search_on_a_tiny_model(tiny_model_and_tokenizer):
    import torch

    from llmq.decoding.qstar import LLMStepProposer
    from llmq.models.features import score_continuations
    from llmq.models.qvm import FeatureQVM, ReasoningStep
    from llmq.models.value_heads import CriticHeads
    from llmq.rollout import HFEngine

    model, tokenizer = tiny_model_and_tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    proposer = LLMStepProposer(
        HFEngine(model, tokenizer, progress=False),
        prompt,
        {tokenizer.eos_token_id},
        delimiter=" ",
        max_step_tokens=6,
        temperature=1.0,
    )
    [steps] = proposer([()], 4)
    assert len(steps) == 4 and all(isinstance(s, ReasoningStep) and s.text for s in steps)
    assert all(
        s.final or s.text.endswith(" ") or len(tokenizer(s.text, add_special_tokens=False)["input_ids"]) >= 6
        for s in steps
    )
    assert proposer.generated_tokens > 0

    torch.manual_seed(0)
    heads = CriticHeads(64, 64, hidden_size=8, num_layers=1)
    qvm = FeatureQVM(model, tokenizer, heads, prompt, layer=-1)
    pairs = [((), steps[0]), ((), steps[1]), ((steps[0],), steps[2])]
    values = qvm(pairs)
    state_features, step_features, _ = score_continuations(
        model, tokenizer, [prompt], [[steps[0].text, steps[1].text]], layer=-1, progress=False
    )
    with torch.no_grad():
        expected = heads.q(state_features, step_features[0][None]).mean(0)[0]
    assert values[:2] == pytest.approx(expected.tolist(), abs=1e-5)
    # an answer that ends right after a delimiter ends with an empty step: scored as the end-of-sequence token
    [ended] = qvm([((steps[0],), ReasoningStep("", True))])
    after_first, [end_feature], _ = score_continuations(
        model, tokenizer, [prompt + steps[0].text], [[tokenizer.eos_token]], layer=-1, progress=False
    )
    with torch.no_grad():
        assert ended == pytest.approx(heads.q(after_first, end_feature[None]).mean(0)[0, 0].item(), abs=1e-5)

    is_terminal = lambda state: bool(state) and (state[-1].final or len(state) >= 3)  # noqa: E731
    result = astar_search(
        propose=proposer, q_values=qvm, is_terminal=is_terminal, num_candidates=2, budget=3, max_depth=3
    )
    assert result.expansions <= 3 and result.best.state and len(result.best.state) <= 3


def test_an_answer_the_search_left_unfinished_is_completed_by_the_policy_and_its_tokens_counted(
    tiny_model_and_tokenizer,
):
    """The budget of one expansion ends the search at depth 1, before the random model ends its answer: with
    finish_within the policy samples the rest, up to that many answer tokens in all, and those tokens count."""
    import torch

    from llmq.decoding.qstar import qstar_answer
    from llmq.models.value_heads import CriticHeads
    from llmq.rollout import HFEngine

    model, tokenizer = tiny_model_and_tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    torch.manual_seed(0)
    heads = CriticHeads(64, 64, hidden_size=8, num_layers=1)
    settings = dict(layer=-1, delimiter=" ", budget=1, num_candidates=2, lam=1.0, heuristic="inherited")
    settings |= dict(max_depth=1, step_max_tokens=3, temperature=1.0, seed=0)
    engine = HFEngine(model, tokenizer, progress=False)
    path, path_tokens, searched = qstar_answer(model, tokenizer, engine, prompt, heads, **settings)
    assert len(searched.best.state) == 1 and not searched.best.state[0].final
    answer, tokens, finished = qstar_answer(model, tokenizer, engine, prompt, heads, **settings, finish_within=20)
    assert finished.best.state == searched.best.state and answer.startswith(path) and len(answer) > len(path)
    path_length = len(tokenizer(path, add_special_tokens=False)["input_ids"])
    assert 0 < tokens - path_tokens <= 20 - path_length  # the rest's sampled tokens count, within the answer's 20
    # An answer that already fills the budget is returned as the search left it.
    assert qstar_answer(model, tokenizer, engine, prompt, heads, **settings, finish_within=1)[:2] == (
        path,
        path_tokens,
    )


@pytest.mark.slow
@pytest.mark.parametrize("label", ["rollout", "fqi"])
def test_llmq_train_qvm_labels_steps_and_saves_loadable_heads(
    label, tmp_path, data_dir, tiny_model_dir, tiny_model_and_tokenizer
):
    import json

    from llmq.cli import main
    from llmq.models.qvm import load_qvm

    out = tmp_path / "qvm"
    argv = [
        "train",
        "--method",
        "qvm",
        "--model_name_or_path",
        "tiny-llama",
        "--output_dir",
        str(out),
        "--data_dir",
        str(data_dir),
        "--limit",
        "2",
        "--trajectories",
        "1",
        "--rollouts",
        "2",
        "--max_new_tokens",
        "12",
        "--delimiter",
        " ",
        "--qvm_steps",
        "5",
        "--qvm_batch_size",
        "4",
        "--qvm_hidden_size",
        "8",
        "--label",
        label,
        "--fqi_iterations",
        "1",
        "--fqi_candidates",
        "2",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
    ]
    assert main([*argv, "--heldout_questions", "2", "--heldout_answers", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] >= 2 and 0 <= summary["rollout_label_mean"] <= 1 and summary["label"] == label
    heads, metadata = load_qvm(out, tiny_model_and_tokenizer[0])
    assert metadata["delimiter"] == " " and heads.q_heads[0][0].in_features == 2 * metadata["state_dim"]
    assert (
        metadata["label_source"] == "tiny-llama" and metadata["positive_label_rate"] == summary["positive_label_rate"]
    )
    assert summary["heldout_ranking"]["heldout_questions"] == 2 and "pairwise_accuracy" in summary["heldout_ranking"]
    # the labels, exported in TRL's stepwise-supervision format: one row per sampled solution
    labelled = json.loads((out / "labels.json").read_text())
    rows = [json.loads(line) for line in (out / "stepwise.jsonl").read_text().splitlines()]
    assert sum(len(row["completions"]) for row in rows) == len(labelled) and len(rows) == 2
    assert [mark for row in rows for mark in row["labels"]] == [r["label"] > 0.5 for r in labelled]
    assert summary["positive_label_rate"] == pytest.approx(sum(r["label"] > 0.5 for r in labelled) / len(labelled))
    if label == "rollout":  # the exported labels train a QVM again, read back in the same format
        imported = tmp_path / "imported"
        replaced = [str(imported) if a == str(out) else a for a in argv]
        assert main([*replaced, "--stepwise_dataset", str(out / "stepwise.jsonl")]) == 0
        again = json.loads((imported / "labels.json").read_text())
        assert [r["label"] for r in again] == [float(r["label"] > 0.5) for r in labelled]
        assert [r["step"]["text"] for r in again] == [r["step"]["text"] for r in labelled]
        assert json.loads((imported / "qvm.json").read_text())["label_source"] == str(out / "stepwise.jsonl")
    if label == "rollout":  # the saved QVM drives `llmq eval --decoding qstar`
        report_dir = tmp_path / "eval"
        argv = [
            "eval",
            "--model_name_or_path",
            "tiny-llama",
            "--data_dir",
            str(data_dir),
            "--limit",
            "2",
            "--decoding",
            "qstar",
            "--qvm_path",
            str(out),
            "--temperature",
            "1.0",
            "--search_budget",
            "2",
            "--search_candidates",
            "2",
            "--step_max_tokens",
            "4",
            "--search_max_depth",
            "3",
            "--output_dir",
            str(report_dir),
        ]
        assert main(argv) == 0
        report = json.loads((report_dir / "report.json").read_text())
        assert report["protocol"]["decoding"]["decoding"] == "qstar" and report["generated_tokens"] > 0
        assert sorted(p.name for p in (report_dir / "search_trees").iterdir()) == ["0.html", "1.html"]
        assert "Q* search, question 1" in (report_dir / "search_trees" / "1.html").read_text()
        assert (
            main(["eval", "--model_name_or_path", "tiny-llama", "--decoding", "qstar", "--temperature", "1.0"]) == 2
        )  # no qvm_path
        # the same QVM as a best-of-N scorer of whole answers
        argv = [
            "eval",
            "--model_name_or_path",
            "tiny-llama",
            "--data_dir",
            str(data_dir),
            "--limit",
            "2",
            "--decoding",
            "best_of_n",
            "--scorer",
            "qvm",
            "--qvm_path",
            str(out),
            "--num_candidates",
            "3",
            "--temperature",
            "1.0",
            "--max_new_tokens",
            "6",
            "--output_dir",
            str(tmp_path / "bon"),
        ]
        assert main(argv) == 0
        records = [json.loads(line) for line in (tmp_path / "bon" / "completions.jsonl").read_text().splitlines()]
        assert all(r["completions"][0] == max(r["candidates"], key=lambda c: c["score"])["text"] for r in records)


def test_qvm_scores_an_answer_by_its_last_step_after_the_others(tiny_model_and_tokenizer, tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from llmq.decoding.best_of_n import qvm_scores
    from llmq.models.qvm import FeatureQVM, ReasoningStep, load_qvm, weights_checksum
    from llmq.models.value_heads import CriticHeads
    from llmq.rollout import Completion

    model, tokenizer = tiny_model_and_tokenizer
    torch.manual_seed(0)
    heads = CriticHeads(64, 64, hidden_size=8, num_layers=1).eval()
    save_file(heads.state_dict(), str(tmp_path / "model.safetensors"))
    metadata = {"layer": -1, "delimiter": "\n", "hidden_size": 8, "num_layers": 1, "state_dim": 64}
    (tmp_path / "qvm.json").write_text(json.dumps(metadata | {"base_model_sha256": weights_checksum(model)}))
    prompt = [{"role": "user", "content": "What is 2+3?"}]
    answers = ["2 + 3 = 5\n#### 5", "5", "#### 5\n", ""]
    [scores] = qvm_scores(
        load_qvm(tmp_path, model), model, tokenizer, [prompt], [[Completion(text, [], [], "stop") for text in answers]]
    )
    qvm = FeatureQVM(
        model,
        tokenizer,
        heads,
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
        layer=-1,
    )
    step = lambda text, final=False: ReasoningStep(text, final)  # noqa: E731
    expected = qvm(
        [
            ((step("2 + 3 = 5\n"),), step("#### 5", True)),
            ((), step("5", True)),
            ((), step("#### 5\n", True)),
            ((), step("", True)),
        ]
    )
    assert scores == pytest.approx(expected, abs=1e-6)
    assert scores[0] != pytest.approx(
        qvm([((), step(answers[0], True))])[0], abs=1e-4
    )  # not the whole answer as one step


def test_split_steps_keeps_delimiters():
    from llmq.models.qvm import split_steps

    assert split_steps("a = 1\nb = 2\n#### 3", "\n") == ["a = 1\n", "b = 2\n", "#### 3"]
    for text in ("a\n\nb\n", "\nfirst\n\n\nsecond", "one line", "a\n", "x\n\n"):
        assert "".join(split_steps(text, "\n")) == text
    assert split_steps("a\n\nb\n", "\n") == ["a\n\n", "b\n"]
    assert split_steps("", "\n") == []


def test_search_tree_page_escapes_steps_and_highlights_the_answer():
    from llmq.visualize import render_search_tree_html

    mdp = toy_mdp().with_sequence_reward()
    propose, q_values = oracle_callables(mdp)
    result = astar_search(
        propose=propose, q_values=q_values, is_terminal=mdp.is_terminal, num_candidates=3, budget=20, max_depth=3
    )
    page = render_search_tree_html(
        result.nodes,
        [n.id for n in result.path()],
        title="toy <tree>",
        prompt="q & a",
        step_text=lambda a: f"<script>{a}</script>",
    )
    assert "<script>" not in page and "&lt;script&gt;" in page and "toy &lt;tree&gt;" in page and "q &amp; a" in page
    assert page.count('class="node path') == len(result.path())


def test_label_builders_converge_to_q_hard():
    """Rollout-max labels from M samples of π_ref tighten to Q_hard as M grows (full support);
    fitted Q iteration with every candidate reaches Q_hard exactly after `horizon` iterations."""
    import numpy as np

    from llmq.losses import fqi_labels, rollout_max_labels

    mdp = random_mdp(5, vocab_size=3, horizon=3, reward_placement="sequence")
    q_hard = hard_optimal(mdp).q
    pairs = [(s, a) for s in mdp.states for a in range(mdp.n_actions) if mdp.reference_policy[s][a] > 0]
    rng = np.random.default_rng(0)

    def rollout(state):
        while not mdp.is_terminal(state):
            state = state + (int(rng.choice(mdp.n_actions, p=mdp.reference_policy[state])),)
        return state

    errors = []
    for m in (1, 4, 64):
        labels = []
        for s, a in pairs:
            child = s + (a,)
            done = mdp.is_terminal(child)
            returns = (
                [mdp.trajectory_return(child)] if done else [mdp.trajectory_return(rollout(child)) for _ in range(m)]
            )
            labels += rollout_max_labels([0.0], [returns])  # sequence rewards: all at the end, inside the returns
        errors.append(max(abs(label - q_hard[s][a]) for label, (s, a) in zip(labels, pairs)))
        assert all(label <= q_hard[s][a] + 1e-12 for label, (s, a) in zip(labels, pairs))  # a lower estimate
    assert errors[0] > errors[-1] and errors[-1] < 1e-9

    q = {pair: 0.0 for pair in pairs}
    for _ in range(mdp.horizon):
        rewards = [float(mdp.rewards[s][a]) for s, a in pairs]
        dones = [mdp.is_terminal(s + (a,)) for s, a in pairs]
        next_q = [[q[(s + (a,), c)] for c in range(mdp.n_actions) if (s + (a,), c) in q] or [0.0] for s, a in pairs]
        q = dict(zip(pairs, fqi_labels(rewards, dones, next_q)))
    assert max(abs(q[(s, a)] - q_hard[s][a]) for s, a in pairs) < 1e-12


def test_a_qvm_used_with_a_model_other_than_its_base_is_refused_naming_both(tiny_model_and_tokenizer, tmp_path):
    import copy

    import torch

    from llmq.errors import UserError
    from llmq.models.qvm import load_qvm, save_qvm, weights_checksum
    from llmq.models.value_heads import CriticHeads

    model, _ = tiny_model_and_tokenizer
    metadata = {"base_model": "tiny-llama", "layer": -1, "delimiter": "\n", "hidden_size": 8, "num_layers": 1}
    save_qvm(
        CriticHeads(64, 64, 8, 1), tmp_path, metadata | {"state_dim": 64, "base_model_sha256": weights_checksum(model)}
    )
    load_qvm(tmp_path, model)
    load_qvm(tmp_path, copy.deepcopy(model).to(torch.bfloat16))  # the same weights in another dtype
    other = copy.deepcopy(model)
    other.name_or_path = "another-model"
    with torch.no_grad():
        other.model.norm.weight[0] += 0.5  # the same architecture and width, other weights
    with pytest.raises(
        UserError, match="trained on the features of 'tiny-llama', whose weights differ .* 'another-model'"
    ):
        load_qvm(tmp_path, other)


def test_llmq_eval_refuses_a_search_lambda_that_is_not_positive(tmp_path, capsys):
    from llmq.cli import main

    argv = ["eval", "--model_name_or_path", "tiny-llama", "--decoding", "qstar", "--qvm_path", str(tmp_path)]
    assert main([*argv, "--temperature", "1.0", "--search_lambda", "0"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("key 'search_lambda' must be > 0 (the weight of the QVM's h in f), got 0.0")
    )


def test_a_utility_above_its_stated_maximum_is_refused():
    mdp = random_mdp(0, vocab_size=3, horizon=4, reward_placement="sequence")
    propose, q_values = oracle_callables(mdp)
    with pytest.raises(ValueError, match="above utility_max"):
        astar_search(
            propose=propose,
            q_values=q_values,
            is_terminal=mdp.is_terminal,
            num_candidates=3,
            budget=10,
            max_depth=4,
            aggregate="last",
            utility=lambda state: 2.0,
            utility_max=1.0,
        )


def test_a_label_model_samples_the_labels_and_one_with_another_tokenizer_is_refused(
    tmp_path, data_dir, tiny_model_dir, capsys
):
    import json
    import shutil

    from llmq.cli import main
    from llmq.models.tiny import build_tiny_llama

    stronger = tmp_path / "stronger"
    build_tiny_llama(stronger, seed=1)  # same tokenizer, other weights
    argv = ["train", "--method", "qvm", "--model_name_or_path", "tiny-llama", "--data_dir", str(data_dir)]
    argv += ["--limit", "1", "--trajectories", "1", "--rollouts", "1", "--max_new_tokens", "6", "--delimiter", " "]
    argv += ["--qvm_steps", "2", "--qvm_batch_size", "4", "--qvm_hidden_size", "8", "--report_to", "none"]
    argv += ["--use_cpu", "true"]
    assert main([*argv, "--output_dir", str(tmp_path / "qvm"), "--label_model", str(stronger)]) == 0
    assert json.loads((tmp_path / "qvm" / "qvm.json").read_text())["label_source"] == str(stronger)
    assert json.loads((tmp_path / "qvm" / "summary.json").read_text())["label_source"] == str(stronger)

    other = tmp_path / "other"
    shutil.copytree(stronger, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    assert main([*argv, "--output_dir", str(tmp_path / "refused"), "--label_model", str(other)]) == 2
    assert "key 'label_model': '" in capsys.readouterr().err


def test_stepwise_rows_and_read_stepwise_round_trip(tmp_path):
    import json

    from llmq.methods.qvm import LabelledStep, read_stepwise, stepwise_rows
    from llmq.models.qvm import ReasoningStep

    a, b, c = ReasoningStep("2 + 3 = 5\n", False), ReasoningStep("#### 5", True), ReasoningStep("#### 6", True)
    items = [
        LabelledStep(0, (), a, 1.0, False),
        LabelledStep(0, (a,), b, 1.0, True),
        LabelledStep(1, (), c, 0.0, True),
    ]
    rows = stepwise_rows(["What is 2+3?", "What is 3+3?"], items, [1.0, 1.0, 0.0], "\n")
    assert rows == [
        {"prompt": "What is 2+3?", "completions": ["2 + 3 = 5", "#### 5"], "labels": [True, True]},
        {"prompt": "What is 3+3?", "completions": ["#### 6"], "labels": [False]},
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    questions, read_items, labels = read_stepwise(str(tmp_path / "steps.jsonl"), "\n")
    assert questions == ["What is 2+3?", "What is 3+3?"] and labels == [1.0, 1.0, 0.0]
    assert [(i.before, i.step, i.last) for i in read_items] == [(i.before, i.step, i.last) for i in items]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "q", "completions": ["x"]}) + "\n")
    with pytest.raises(UserError, match="lacks the column"):
        read_stepwise(str(tmp_path / "bad.jsonl"), "\n")


def test_within_question_ranking_counts_pairs_of_one_question_only():
    from llmq.stats import within_question_ranking

    ranking = within_question_ranking(
        [[0.9, 0.1, 0.5], [0.2, 0.3], [1.0, 1.0], [0.4, 0.4]],
        [[True, False, False], [True, False], [True, True], [True, False]],
    )
    # question 1: 2 of 2 pairs; question 2: 0 of 1; question 3: no wrong answer; question 4: a tie, ½
    assert ranking["pairwise_accuracy"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert (ranking["questions"], ranking["pairs"]) == (3, 4)
    assert ranking["ci95"][0] <= ranking["pairwise_accuracy"] <= ranking["ci95"][1]
