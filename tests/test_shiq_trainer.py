"""ShiQTrainer and its data path on a tiny random Llama."""

import json
import math

import datasets
import pytest
import torch
from conftest import SCORED_ROWS as ROWS
from conftest import make_shiq_trainer
from peft import LoraConfig

from llmq.cli import main
from llmq.data.trajectories import TrajectoryCollator, tokenize_trajectory
from llmq.errors import UserError
from llmq.losses import shiq_loss
from llmq.mdp import action_logit_rows
from llmq.models import load_model, load_tokenizer

CONVERSATION = {
    "messages": [
        {"role": "user", "content": "Find x."},
        {"role": "assistant", "content": "search(x)"},
        {"role": "tool", "content": "x=3"},
        {"role": "assistant", "content": "x is 3"},
    ],
    "turn_rewards": [0.25, 1.0],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer("tiny-llama")


def test_a_few_steps_change_the_parameters_and_log_finite_metrics(tokenizer, tmp_path):
    trainer = make_shiq_trainer(tokenizer, tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        for name in ("loss", "delta/abs_mean", "rho/mean", "u/mean", "kl", "rewards/mean", "rewards/std", "grad_norm"):
            assert math.isfinite(entry[name]), (name, entry)
    assert logged[-1]["loss"] < logged[0]["loss"]


@pytest.mark.parametrize("reward", [0.0, 1.0, -2.0])
def test_first_loss_at_the_reference_is_reward_squared(tokenizer, tmp_path, reward):
    # At θ = θ_ref, ρ = u = 0 so δ_t = −R on every action token: zero reward ⇒ loss exactly 0.
    rows = [dict(row, reward=reward) for row in ROWS]
    trainer = make_shiq_trainer(tokenizer, tmp_path, rows=rows, max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == reward**2


def test_precomputed_reference_gives_the_same_losses_as_a_live_one(tokenizer, tmp_path):
    # The longer (rewarded) completions truncated: the longest row's bootstrap state is no row's action position, so
    # only its truncation gets that state's reference statistics scored.
    rows = [dict(row, truncated=i % 2 == 1) for i, row in enumerate(ROWS)]
    live = make_shiq_trainer(tokenizer, tmp_path / "live", rows=rows)
    precomputed = make_shiq_trainer(tokenizer, tmp_path / "pre", rows=rows, precompute_ref_log_probs=True)
    assert precomputed.ref_model is None and "ref_lse" in precomputed.train_dataset.column_names
    live.train()
    precomputed.train()
    losses = lambda t: [entry["loss"] for entry in t.state.log_history if "loss" in entry]  # noqa: E731
    assert losses(live) == pytest.approx(losses(precomputed), abs=1e-6)


def test_lora_trains_adapters_only_and_its_reference_is_the_base_model(tokenizer, tmp_path):
    rows = [dict(row, reward=1.0) for row in ROWS]
    trainer = make_shiq_trainer(
        tokenizer, tmp_path, rows=rows, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    assert trainer.ref_model is None
    base = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" not in name}
    trainer.train()
    assert all(torch.equal(p, base[name]) for name, p in trainer.model.named_parameters() if "lora_" not in name)
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at 0, so training moved it
    assert trainer.state.log_history[0]["loss"] == 1.0  # adapters start as a no-op: the model is the reference


def test_a_q_model_starts_at_its_reference_and_learns_logits_that_guide_it(tokenizer, tmp_path):
    """A Q model beside another model (the one it will guide): Q ≡ 0 at the start, so the first loss is the squared
    reward as at any reference; trained, its logits are Q/β and it reloads as a Q model."""
    from llmq.decoding import QGuidedLogitsProcessor
    from llmq.models.q_model import is_q_model
    from llmq.models.tiny import build_tiny_llama

    build_tiny_llama(tmp_path / "base", seed=1)
    rows = [dict(row, reward=1.0) for row in ROWS]
    trainer = make_shiq_trainer(
        tokenizer, tmp_path / "out", rows=rows, q_model=True, ref_model_name_or_path=str(tmp_path / "base")
    )
    base = load_model(str(tmp_path / "base"), dtype="float32")
    assert all(torch.equal(p, q) for p, q in zip(trainer.ref_model.parameters(), base.parameters()))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == 1.0 and losses[-1] < losses[0]
    trainer.save_model(str(tmp_path / "q"))
    q_model = load_model(str(tmp_path / "q"), dtype="float32")
    assert is_q_model(q_model)

    # Guided decoding with the Q model samples the policy ShiQ trained: softmax(ℓ_base + ℓ_Q).
    ids = tokenizer("Q1: what is 1+1?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits, q_logits = base(ids).logits[:, -1], q_model(ids).logits[:, -1]
    processor = QGuidedLogitsProcessor(q_model, beta=0.1, top_k=0, q_model=True)
    torch.testing.assert_close(
        torch.log_softmax(processor(ids, base_logits), dim=-1), torch.log_softmax(base_logits + q_logits, dim=-1)
    )


def test_a_reference_with_another_vocabulary_is_one_clear_error(tokenizer, tmp_path):
    other = load_model("tiny-llama", dtype="float32")
    other.resize_token_embeddings(other.config.vocab_size + 8)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="key 'ref_model_name_or_path'.*must share the policy's vocabulary"):
        make_shiq_trainer(tokenizer, tmp_path / "out", ref_model_name_or_path=str(tmp_path / "other"))


def test_multi_turn_masks_observations_and_places_turn_rewards(tokenizer):
    row = tokenize_trajectory(CONVERSATION, tokenizer, max_length=512, index=0)
    ids, mask, rewards = row["input_ids"], row["act_mask"], row["rewards"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "search(x)<|im_end|>x is 3<|im_end|>"
    rewarded = [(tokenizer.decode([ids[p]]), r) for p, r in enumerate(rewards) if r]
    assert rewarded == [("<|im_end|>", 0.25), ("<|im_end|>", 1.0)]
    # The loss ignores what the model predicts at observation tokens.
    batch = TrajectoryCollator(tokenizer.pad_token_id)([row])
    logits = torch.randn(1, batch["input_ids"].shape[1], len(tokenizer))
    ref_logits = torch.randn_like(logits)
    kwargs = dict(input_ids=batch["input_ids"], act_mask=batch["act_mask"], rewards=batch["rewards"], beta=0.5)
    loss, _ = shiq_loss(logits, ref_logits, **kwargs)
    observation_rows = (~batch["act_mask"][0, 1:]).nonzero().flatten()  # row p-1 scores token p
    perturbed = logits.clone()
    perturbed[0, observation_rows] += torch.randn(len(observation_rows), len(tokenizer))
    assert shiq_loss(perturbed, ref_logits, **kwargs)[0] == loss


def test_logits_kept_only_at_action_rows_give_the_full_logits_loss_and_gradients(tokenizer):
    rows = [
        tokenize_trajectory(CONVERSATION, tokenizer, max_length=512, index=0),
        tokenize_trajectory(
            {"prompt": "Q", "completion": " abc", "reward": 0.5, "truncated": True}, tokenizer, 512, 1
        ),
    ]
    batch = TrajectoryCollator(tokenizer.pad_token_id)(rows)
    model, ref_model = load_model("tiny-llama", dtype="float32"), load_model("tiny-llama", dtype="float32")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    kwargs = dict(act_mask=batch["act_mask"], rewards=batch["rewards"], truncated=batch["truncated"], beta=0.5)
    kept = action_logit_rows(batch["act_mask"], batch["truncated"])
    assert len(kept) < batch["input_ids"].shape[1] // 2  # the prompts and observations are most of the tokens

    losses, gradients = [], []
    for logits_to_keep, logit_rows in ((0, None), (kept, kept)):
        model.zero_grad()
        ref_logits = ref_model(**inputs, logits_to_keep=logits_to_keep).logits
        logits = model(**inputs, logits_to_keep=logits_to_keep).logits
        loss, _ = shiq_loss(logits, ref_logits, input_ids=inputs["input_ids"], logit_rows=logit_rows, **kwargs)
        loss.backward()
        losses.append(loss.detach())
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="logit_rows lack rows"):
        shiq_loss(logits[:, 1:], ref_logits[:, 1:], input_ids=inputs["input_ids"], logit_rows=kept[1:], **kwargs)


def test_the_trainer_asks_its_models_for_the_action_rows_only(tokenizer, tmp_path):
    trainer = make_shiq_trainer(tokenizer, tmp_path)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    kept = action_logit_rows(batch["act_mask"], batch["truncated"])
    assert outputs["logits"].shape[1] == len(kept) < batch["input_ids"].shape[1] - 1


def test_truncated_rows_end_without_an_end_of_turn_action(tokenizer):
    standard = tokenize_trajectory(
        {"prompt": "Q", "completion": " abc", "reward": 0.0, "truncated": True}, tokenizer, 512, 0
    )
    assert tokenizer.eos_token_id not in standard["input_ids"]
    chat = {
        "prompt": [{"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "abc"}],
        "reward": 0.0,
        "truncated": True,
    }
    row = tokenize_trajectory(chat, tokenizer, 512, 0)
    assert tokenizer.decode([i for i, m in zip(row["input_ids"], row["act_mask"]) if m]) == "abc"
    assert row["truncated"] and tokenizer.decode(row["input_ids"]).endswith("assistant\nabc")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q", "completion": " a", "reward": "high"}, "row 3: reward must be a finite number"),
        ({"prompt": "Q", "completion": " a", "reward": float("nan")}, "row 3: reward must be a finite number"),
        ({"prompt": "", "completion": " a", "reward": 1.0}, "row 3: 'prompt' must be a non-empty string"),
        ({"prompt": "Q", "completion": " a"}, "row 3: needs 'reward', 'token_rewards' or 'turn_rewards'"),
        (
            {"prompt": "Q", "completion": " a", "token_rewards": [1.0]},
            "row 3: 'token_rewards' needs one number per action token (3)",
        ),
        ({"prompt": "Q" * 600, "completion": " a", "reward": 1.0}, "row 3: 603 tokens exceed max_length=512"),
        (dict(CONVERSATION, turn_rewards=[1.0]), "row 3: 'turn_rewards' needs one number per assistant turn (2)"),
        ({"messages": [{"role": "user", "content": "hi"}], "reward": 1.0}, "row 3: no assistant message"),
        ({"prompt": "Q", "completion": "  ", "reward": 1.0}, "row 3: the completion is empty"),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "completion": [{"role": "assistant", "content": ""}],
                "reward": 1.0,
            },
            "row 3: assistant message 1 is empty",
        ),
    ],
)
def test_malformed_rows_name_their_index(tokenizer, row, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tokenize_trajectory(row, tokenizer, max_length=512, index=3)


@pytest.mark.slow
def test_llmq_train_cli_end_to_end(tmp_path, capsys, shiq_recipe):
    recipe = shiq_recipe(
        tmp_path,
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        use_cpu=True,
        save_strategy="no",
        beta=0.5,
    )
    assert main(["train", str(recipe), "--loss_type", "one_step"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train_rows"] == 8 and math.isfinite(summary["train"]["train_loss"])
    reloaded = load_model(str(tmp_path / "out"), dtype="float32")
    assert sum(p.numel() for p in reloaded.parameters()) > 0
    assert main(["train", str(recipe), "--dataset_path", str(tmp_path / "missing")]) == 2
    assert "key 'dataset_path'" in capsys.readouterr().err


@pytest.mark.slow
def test_llmq_train_of_a_q_model_beside_another_model_guides_that_models_generation(
    tmp_path, capsys, shiq_recipe, data_dir
):
    from llmq.models.tiny import build_tiny_llama

    build_tiny_llama(tmp_path / "base", seed=1)
    keys = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=0.01, use_cpu=True, save_strategy="no")
    keys |= dict(q_model=True, ref_model_name_or_path=str(tmp_path / "base"), output_dir=str(tmp_path / "q"))
    recipe = shiq_recipe(tmp_path, **keys)
    assert main(["train", str(recipe)]) == 0
    generate = ["generate", "--model_name_or_path", str(tmp_path / "base"), "--data_dir", str(data_dir)]
    generate += ["--limit", "2", "--max_new_tokens", "4", "--decoding", "guided", "--guide_model", str(tmp_path / "q")]
    assert main([*generate, "--dataset_path", str(tmp_path / "guided")]) == 0
    # Alone, a Q model is no policy: a benchmark of it is refused, and so is scoring with it as a policy.
    assert main(["train", str(recipe), "--benchmark_task", "gsm8k"]) == 2
    assert "keys 'q_model' and 'benchmark_task'" in capsys.readouterr().err
    scoring = [*generate[:7], "--decoding", "best_of_n", "--scorer", "implicit_reward", "--num_candidates", "4"]
    scoring += ["--temperature", "1.0", "--guide_model", str(tmp_path / "q"), "--dataset_path", str(tmp_path / "b")]
    assert main(scoring) == 2
    assert "is a Q model" in capsys.readouterr().err


@pytest.mark.slow
def test_llmq_train_on_mixed_groups_only_trains_on_the_questions_with_a_right_and_a_wrong_answer(
    tmp_path, capsys, tiny_model_dir
):
    rows = [dict(row, question_index=min(i // 2, 3)) for i, row in enumerate(ROWS)]
    rows[7]["reward"] = 0.0  # question 3: both answers wrong, no contrast
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["train", "--model_name_or_path", "tiny-llama", "--dataset_path", str(data), "--output_dir"]
    options = ["--max_steps", "1", "--use_cpu", "true", "--save_strategy", "no", "--report_to", "none"]
    assert main([*argv, str(tmp_path / "out"), *options, "--mixed_groups_only", "true"]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["train_rows"] == 6
    data.write_text(
        "".join(json.dumps({k: v for k, v in row.items() if k != "question_index"}) + "\n" for row in rows)
    )
    assert main([*argv, str(tmp_path / "bad"), *options, "--mixed_groups_only", "true"]) == 2
    assert "no 'question_index' column" in capsys.readouterr().err


@pytest.mark.parametrize("use_lora", [False, True])
def test_gradient_checkpointing_gives_the_same_first_steps(tokenizer, tmp_path, use_lora):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if use_lora else None
    plain = make_shiq_trainer(tokenizer, tmp_path / "plain", peft_config=lora, max_steps=2)
    checkpointed = make_shiq_trainer(
        tokenizer, tmp_path / "ckpt", peft_config=lora, max_steps=2, gradient_checkpointing=True
    )
    plain.train()
    checkpointed.train()
    losses = lambda t: [entry["loss"] for entry in t.state.log_history if "loss" in entry]  # noqa: E731
    assert losses(plain) == pytest.approx(losses(checkpointed), abs=1e-5)


def test_conversational_prompt_completion_rows_train(tokenizer, tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"]}],
            "reward": row["reward"],
        }
        for row in ROWS
    ]
    trainer = make_shiq_trainer(tokenizer, tmp_path, rows=rows, max_steps=2)
    first = trainer.train_dataset[0]
    actions = tokenizer.decode([i for i, m in zip(first["input_ids"], first["act_mask"]) if m])
    assert actions == ROWS[0]["completion"] + "<|im_end|>" and tokenizer.decode(first["input_ids"]).startswith(
        "<|im_start|>user\n"
    )
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_preference_pairs_take_best_and_worst_per_question():
    from llmq.data.offline import preference_pairs

    def row(question, reward, text):
        return {
            "prompt": [{"role": "user", "content": f"q{question}"}],
            "completion": [{"role": "assistant", "content": text}],
            "reward": reward,
            "question_index": question,
        }

    scored = datasets.Dataset.from_list(
        [
            row(0, 0.0, "a"),
            row(0, 1.0, "b"),
            row(0, 0.5, "c"),
            row(1, 0.0, "d"),
            row(1, 0.0, "e"),
            row(2, 1.5, "f"),
            row(2, 0.5, "g"),
        ]
    )
    pairs = preference_pairs(scored)
    assert pairs["question_index"] == [0, 2]  # question 1 has no preference
    assert [p[0]["content"] for p in pairs["chosen"]] == ["b", "f"] and [
        p[0]["content"] for p in pairs["rejected"]
    ] == ["a", "g"]
    with pytest.raises(UserError, match="no question has completions with different rewards"):
        preference_pairs(scored.select([3, 4]))


def test_mixed_reward_groups_keep_every_sample_of_the_questions_with_different_rewards():
    from llmq.data.offline import mixed_reward_groups

    def row(question, reward):
        return {
            "prompt": f"q{question}",
            "completion": f"{question}:{reward}",
            "reward": reward,
            "question_index": question,
        }

    scored = datasets.Dataset.from_list(
        [row(0, 0.0), row(1, 0.0), row(0, 1.0), row(1, 0.0), row(2, 1.0), row(2, 1.0), row(0, 0.0), row(3, 0.5)]
    )
    kept = mixed_reward_groups(scored)
    assert kept["completion"] == ["0:0.0", "0:1.0", "0:0.0"]  # all wrong, all right, a lone sample: dropped
    assert kept.column_names == scored.column_names
    with pytest.raises(UserError, match="no question has completions with different rewards"):
        mixed_reward_groups(scored.select([1, 3, 4, 5]))
    with pytest.raises(UserError, match="no 'question_index' column"):
        mixed_reward_groups(scored.remove_columns("question_index"))


def test_mixed_groups_only_is_refused_for_methods_other_than_shiq(tmp_path):
    from llmq.methods.offline import Config

    data = tmp_path / "scored.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    assert Config(method="shiq", engine="hf", dataset_path=str(data), mixed_groups_only=True).mixed_groups_only
    with pytest.raises(UserError, match="key 'mixed_groups_only' is for method shiq"):
        Config(method="dpo", engine="hf", dataset_path=str(data), mixed_groups_only=True)


@pytest.mark.slow
def test_llmq_train_dpo_method_on_scored_data(tmp_path, tiny_model_dir):
    data = tmp_path / "scored.jsonl"
    rows = [dict(row, question_index=i // 2) for i, row in enumerate(ROWS)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = [
        "train",
        "--method",
        "dpo",
        "--model_name_or_path",
        "tiny-llama",
        "--dataset_path",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--use_cpu",
        "true",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--gradient_checkpointing",
        "false",
        "--beta",
        "0.1",
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (
        summary["method"] == "dpo"
        and summary["preference_pairs"] == 4
        and math.isfinite(summary["train"]["train_loss"])
    )


def test_a_non_finite_loss_stops_with_a_checkpoint_of_the_last_good_weights(tokenizer, tmp_path):
    import re

    from safetensors.torch import load_file

    from llmq.errors import NonFiniteLossError

    rows = [
        dict(row, reward=1e30 if i == 4 else row["reward"]) for i, row in enumerate(ROWS)
    ]  # finite, but its square overflows fp32
    trainer = make_shiq_trainer(tokenizer, tmp_path, rows=rows, per_device_train_batch_size=2, max_steps=4)
    with pytest.raises(NonFiniteLossError) as failure:
        trainer.train()
    step = int(re.search(r"the weights of step (\d+) are saved", str(failure.value)).group(1))
    assert f"became inf at step {step + 1}" in str(failure.value) and "\n" not in str(failure.value)
    folder = tmp_path / f"checkpoint-{step}"
    saved = load_file(str(folder / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())
    current = dict(trainer.model.named_parameters())
    assert all(
        torch.equal(tensor, current[name].detach()) for name, tensor in saved.items() if name in current
    )  # the bad step was never applied
    assert set(saved) & set(current)
    assert (folder / "trainer_state.json").is_file()


def test_skip_invalid_rows_counts_and_names_the_skipped_rows(tokenizer, tmp_path):
    rows = ROWS + [
        {"prompt": "Q", "completion": "", "reward": 1.0},
        {"prompt": "Q", "completion": " a", "reward": float("nan")},
        {"prompt": "Q" * 2000, "completion": " a", "reward": 1.0},
    ]
    with pytest.raises(UserError, match="row 8: the completion is empty"):
        make_shiq_trainer(tokenizer, tmp_path, rows=rows)
    with pytest.warns(
        UserWarning,
        match=r"skipped 3 of 11 rows: dataset row 8: the completion is empty; dataset row 9: reward must be a "
        r"finite number.*; dataset row 10: 2003 tokens exceed",
    ):
        trainer = make_shiq_trainer(
            tokenizer, tmp_path, rows=rows, skip_invalid_rows=True, max_length=1024, max_steps=1
        )
    assert len(trainer.train_dataset) == len(ROWS)
    trainer.train()
    with pytest.raises(UserError, match="every one of the 2 rows is malformed"):
        make_shiq_trainer(tokenizer, tmp_path, rows=rows[-2:], skip_invalid_rows=True)
