"""Q*'s process utility g from the CLI (docs/algorithms.md §4.3): rule-based arithmetic checks, a process reward
model read as TRL's PRMTrainer trains it, the QVM's own step values, and the settings that are refused."""

import json

import pytest
import torch

from llmq.decoding.qstar import arithmetic_penalty


@pytest.mark.parametrize(
    ("step", "penalty"),
    [
        ("3 * 4 = 12\n", 0.0),
        ("3 * 4 = 13\n", -1.0),
        ("She pays $1,200 + $300 = $1,500.\n", 0.0),
        ("She pays $1,200 + $300 = $1,600.\n", -1.0),
        ("10 / 3 = 3.33", 0.0),  # rounded to the decimals shown
        ("10 / 3 = 3.4", -1.0),
        ("10/3 = 3", -1.0),  # an integer is exact
        ("<<48/2=24>>24 clips", 0.0),  # GSM8K's calculator annotations
        ("So 5 + 6 = 11 = 12", -1.0),  # every link of a chain
        ("2 × 3 × 4 = 24 and 7 - 10 = -3", 0.0),
        ("(3 + 4) * 2 = 15", -1.0),
        ("5 apples - 2 = 3 apples", 0.0),  # the left side is cut by a word: not judged
        ("x = 5 and y = 3", 0.0),  # no arithmetic to check
        ("1/0 = 5", 0.0),  # undefined: not judged
        ("9**9**9 = 1", 0.0),  # powers are not evaluated
    ],
)
def test_rules_penalise_a_step_whose_equation_is_false(step, penalty):
    assert arithmetic_penalty(step) == penalty


def test_rules_agree_with_python_arithmetic_on_random_equations():
    """Golds recomputed: a + b·c = v is judged false exactly when v differs from the exact value."""
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        a, b, c, offset = (int(x) for x in torch.randint(0, 50, (4,), generator=rng))
        value = a + b * c + (offset % 3 - 1)
        assert arithmetic_penalty(f"We get {a} + {b} * {c} = {value}.") == (0.0 if value == a + b * c else -1.0)


@pytest.fixture(scope="module")
def tiny_prms(tmp_path_factory):
    from llmq.models.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("prm")
    for head in ("token", "sequence"):
        build_tiny_llama(root / head, head=f"{head}_classification")
    return root


def test_a_token_classification_prm_scores_each_step_where_trl_prm_trainer_labels_it(tiny_prms):
    """TRL's PRMTrainer input: [BOS] + prompt + Σ (step + separator); a step's label sits on the last token of its
    separator. The score there is softmax(logits)[1], and a step's score does not depend on the steps after it."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from llmq.models.prm import ProcessRewardModel

    prm = ProcessRewardModel(str(tiny_prms / "token"), step_separator="\n\n")
    prompt, steps = "What is 2+3?", ["2 + 3 = 5", "#### 5"]
    scores = prm.step_scores(prompt, steps)

    tokenizer = AutoTokenizer.from_pretrained(tiny_prms / "token")
    model = AutoModelForTokenClassification.from_pretrained(tiny_prms / "token").eval()
    separator = tokenizer.encode("\n\n", add_special_tokens=False)
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    labelled = []
    for step in steps:
        ids += tokenizer(step, add_special_tokens=False)["input_ids"] + separator
        labelled.append(len(ids) - 1)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, labelled].softmax(-1)[:, 1]
    assert scores == pytest.approx(expected.tolist(), abs=1e-6)
    assert all(0 < s < 1 for s in scores)
    assert prm.step_scores(prompt, steps[:1]) == pytest.approx(scores[:1], abs=1e-6)


def test_a_sequence_classification_prm_scores_each_prefix_of_steps(tiny_prms):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmq.models.prm import ProcessRewardModel

    prm = ProcessRewardModel(str(tiny_prms / "sequence"))
    prompt, steps = "What is 2+3?", ["2 + 3 = 5", "#### 5"]
    scores = prm.step_scores(prompt, steps)
    tokenizer = AutoTokenizer.from_pretrained(tiny_prms / "sequence")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_prms / "sequence").eval()
    for t, score in enumerate(scores):  # each prefix alone, unpadded
        text = prompt + "".join(step + "\n" for step in steps[: t + 1])
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        assert score == pytest.approx(logits.softmax(-1)[1].item(), abs=1e-5)


def test_a_causal_lm_is_not_taken_for_a_prm(tiny_model_dir):
    from llmq.errors import UserError
    from llmq.models.prm import ProcessRewardModel

    with pytest.raises(UserError, match="key 'prm_path': 'tiny-llama' is not a token- or sequence-classification"):
        ProcessRewardModel("tiny-llama")


def write_qvm(directory, model) -> None:
    """Random QVM heads for ``model`` (the features of its last layer), saved as `llmq train --method qvm` does."""
    from safetensors.torch import save_file

    from llmq.models.qvm import weights_checksum
    from llmq.models.value_heads import CriticHeads

    torch.manual_seed(0)
    heads = CriticHeads(64, 64, hidden_size=8, num_layers=1)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(heads.state_dict(), str(directory / "model.safetensors"))
    metadata = {"layer": -1, "delimiter": " ", "hidden_size": 8, "num_layers": 1, "state_dim": 64}
    (directory / "qvm.json").write_text(json.dumps(metadata | {"base_model_sha256": weights_checksum(model)}))


@pytest.mark.parametrize(("utility", "aggregate"), [("rules", "sum"), ("prm", "min"), ("prm", "last"), ("qvm", "min")])
def test_qstar_search_on_a_tiny_model_aggregates_the_process_utility_of_each_path(
    utility, aggregate, tiny_model_and_tokenizer, tiny_prms, tmp_path
):
    """Every node's g is recomputed from the utilities of the steps on its path: the PRM's scores after the
    question, the rules' penalties, or the QVM's clipped step values; unfinished answers under last get 1."""
    from llmq.decoding.qstar import arithmetic_penalty, qstar_answer
    from llmq.models.prm import ProcessRewardModel
    from llmq.models.qvm import FeatureQVM, load_qvm
    from llmq.rollout import HFEngine

    model, tokenizer = tiny_model_and_tokenizer
    write_qvm(tmp_path / "qvm", model)
    heads, metadata = load_qvm(tmp_path / "qvm", model)
    prm = ProcessRewardModel(str(tiny_prms / "token"))
    question = "What is 2+3?"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    answer, tokens, result = qstar_answer(
        model,
        tokenizer,
        HFEngine(model, tokenizer, progress=False),
        prompt,
        heads,
        layer=-1,
        delimiter=" ",
        budget=4,
        num_candidates=2,
        lam=1.0,
        heuristic="inherited",
        max_depth=3,
        step_max_tokens=4,
        temperature=1.0,
        seed=0,
        utility=utility,
        aggregate=aggregate,
        prm=prm,
        question=question,
    )
    assert tokens > 0 and answer == "".join(step.text for step in result.best.state)
    qvm = FeatureQVM(model, tokenizer, heads, prompt, layer=-1)
    combine = {"min": min, "last": lambda values: values[-1], "sum": sum}[aggregate]
    for node in result.nodes[1:]:
        state = node.state
        if utility == "rules":
            values = [arithmetic_penalty(step.text) for step in state]
        elif utility == "prm":
            values = prm.step_scores(question, [step.text.removesuffix(" ") for step in state])
        else:
            values = [min(max(v, 0.0), 1.0) for v in qvm([(state[:t], state[t]) for t in range(len(state))])]
        expected = 1.0 if aggregate == "last" and not node.terminal else combine(values)
        assert node.g == pytest.approx(expected, abs=1e-5)
        assert node.f == pytest.approx(node.g + node.h, abs=1e-9)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["--search_utility", "prm", "--prm_path", "{prm}", "--search_aggregate", "sum"], "search_aggregate sum with"),
        (["--search_utility", "qvm", "--search_aggregate", "sum"], "search_aggregate sum with search_utility qvm"),
        (["--search_utility", "prm"], "search_utility prm and scorer prm need key 'prm_path'"),
        (["--prm_path", "{prm}"], "key 'prm_path' is used by decoding qstar with search_utility prm"),
        (["--search_utility", "prm", "--prm_path", "{missing}"], "key 'prm_path': unknown model"),
    ],
)
def test_llmq_eval_refuses_process_utility_settings_in_one_line(keys, message, tiny_prms, tmp_path, capsys):
    from llmq.cli import main

    argv = ["eval", "--model_name_or_path", "tiny-llama", "--decoding", "qstar", "--qvm_path", str(tmp_path)]
    keys = [k.format(prm=tiny_prms / "token", missing=tmp_path / "nothing") for k in keys]
    assert main([*argv, "--temperature", "1.0", *keys]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_llmq_eval_searches_with_a_prm_utility_and_ranks_best_of_n_by_the_prm(
    tiny_model_and_tokenizer, tiny_prms, data_dir, tmp_path
):
    from llmq.cli import main
    from llmq.data.tasks import load_task
    from llmq.decoding.best_of_n import prm_scores
    from llmq.models.prm import ProcessRewardModel
    from llmq.rollout import Completion

    model, _ = tiny_model_and_tokenizer
    write_qvm(tmp_path / "qvm", model)
    common = ["eval", "--model_name_or_path", "tiny-llama", "--data_dir", str(data_dir), "--limit", "2"]
    common += ["--temperature", "1.0", "--prm_path", str(tiny_prms / "token")]
    search = ["--decoding", "qstar", "--qvm_path", str(tmp_path / "qvm"), "--search_utility", "prm"]
    search += ["--search_aggregate", "last", "--search_budget", "2", "--search_candidates", "2"]
    search += ["--step_max_tokens", "4", "--search_max_depth", "3", "--output_dir", str(tmp_path / "qstar")]
    assert main([*common, *search]) == 0
    report = json.loads((tmp_path / "qstar" / "report.json").read_text())
    decoding = report["protocol"]["decoding"]
    assert (decoding["search_utility"], decoding["search_aggregate"]) == ("prm", "last")
    assert report["generated_tokens"] > 0

    bon = ["--decoding", "best_of_n", "--scorer", "prm", "--num_candidates", "3", "--max_new_tokens", "8"]
    assert main([*common, *bon, "--output_dir", str(tmp_path / "bon")]) == 0
    records = [json.loads(line) for line in (tmp_path / "bon" / "completions.jsonl").read_text().splitlines()]
    prm, template = ProcessRewardModel(str(tiny_prms / "token")), load_task("gsm8k").prompt
    for record in records:
        texts = [c["text"] for c in record["candidates"]]
        prompt = [{"role": "user", "content": template.replace("{question}", record["question"])}]
        [scores] = prm_scores(prm, "min", [prompt], [[Completion(text, [], [], "stop") for text in texts]])
        assert [c["score"] for c in record["candidates"]] == pytest.approx(scores, abs=1e-5)
        assert record["completions"][0] == texts[max(range(len(texts)), key=lambda i: (scores[i], -i))]


def test_each_utility_scores_the_last_step_of_a_state(tiny_prms):
    from llmq.decoding.qstar import process_utility
    from llmq.models.prm import ProcessRewardModel
    from llmq.models.qvm import ReasoningStep

    first, wrong, right = (ReasoningStep(t, False) for t in ("2 + 2 = 4\n", "4 * 3 = 13\n", "4 * 3 = 12\n"))
    rules = process_utility("rules", scored={}, prm=None, question="q", delimiter="\n")
    assert [rules((first,)), rules((first, wrong)), rules((wrong, right))] == [0.0, -1.0, 0.0]
    scored = {((), first): 0.3, ((first,), wrong): 1.7, ((first,), right): -0.2}
    qvm = process_utility("qvm", scored=scored, prm=None, question="q", delimiter="\n")
    assert [qvm((first,)), qvm((first, wrong)), qvm((first, right))] == [0.3, 1.0, 0.0]
    prm = ProcessRewardModel(str(tiny_prms / "token"))
    by_prm = process_utility("prm", scored={}, prm=prm, question="What is 4*3?", delimiter="\n")
    assert by_prm((first, wrong)) == pytest.approx(prm.step_scores("What is 4*3?", ["2 + 2 = 4", "4 * 3 = 13"])[1])
    assert process_utility("none", scored={}, prm=None, question="q", delimiter="\n") is None


def test_the_last_step_score_is_the_last_of_the_step_scores(tiny_prms):
    from llmq.models.prm import ProcessRewardModel

    for head in ("token", "sequence"):
        prm = ProcessRewardModel(str(tiny_prms / head))
        steps = ["2 + 3 = 5", "#### 5"]
        assert prm.last_step_score("What is 2+3?", steps) == pytest.approx(
            prm.step_scores("What is 2+3?", steps)[-1], abs=1e-5
        )


@pytest.mark.slow
def test_a_prm_trained_by_trl_prm_trainer_on_llmq_stepwise_labels_ranks_a_good_step_above_a_bad_one(
    tiny_model_dir, tmp_path
):
    """examples/train_prm_with_trl.py: TRL's PRMTrainer (TRL 1.13, in the side folder make install fills) fits
    llmq's stepwise.jsonl, and search_utility/scorer prm read the result."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llmq.models.prm import ProcessRewardModel

    side = Path(sys.prefix) / "trl-prm"
    if not (side / "trl" / "experimental" / "prm").is_dir():
        pytest.skip(f"TRL 1.13's PRMTrainer is not in {side} (make install puts it there)")
    stepwise = tmp_path / "stepwise.jsonl"
    rows = [
        {
            "prompt": f"Compute {i} * 2.",
            "completions": ["Let us think.", f"{i} * 2 = {2 * i + wrong}"],
            "labels": [True, not wrong],
        }
        for i in range(16)
        for wrong in (0, 1)
    ]
    stepwise.write_text("".join(json.dumps(row) + "\n" for row in rows))
    script = Path(__file__).parents[1] / "examples" / "train_prm_with_trl.py"
    command = [sys.executable, str(script), "--stepwise", str(stepwise), "--model_name_or_path", str(tiny_model_dir)]
    command += ["--output_dir", str(tmp_path / "prm"), "--num_train_epochs", "20", "--learning_rate", "3e-3"]
    env = os.environ | {"PYTHONPATH": str(side), "TRL_EXPERIMENTAL_SILENCE": "1"}
    subprocess.run(command, check=True, env=env)
    prm = ProcessRewardModel(str(tmp_path / "prm"))
    good = prm.step_scores("Compute 3 * 2.", ["Let us think.", "3 * 2 = 6"])
    bad = prm.step_scores("Compute 3 * 2.", ["Let us think.", "3 * 2 = 7"])
    assert good[-1] > bad[-1]
