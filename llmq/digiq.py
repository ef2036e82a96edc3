"""``llmq train`` with ``method: digiq``: Digi-Q on TextWorld games (ALGORITHMS.md §5).

1. games: seeded train and test sets (:func:`llmq.envs.textworld.make_games`);
2. benchmark before: the base LM plays every test game greedily;
3. offline data: the base LM plays the train games, sampling its commands (the behaviour policy);
4. (optional, ``representation_steps``) representation fine-tuning of a copy of the backbone on
   automatically labelled "does this command change the game?" yes/no questions (§5.4), then
   frozen features of every state and every (state, admissible command) pair, computed once
   (:func:`llmq.models.features.score_continuations`: a state read once, its commands through the KV cache; cached on disk);
5. critic: double Q/V heads fitted by TD on the logged actions (:class:`DigiQCriticTrainer`);
6. Best-of-N extraction: in every logged state, the admissible command with the largest
   ``max Q − max V`` is kept when that advantage exceeds ``threshold`` (:func:`best_of_n_advantages`);
7. actor: supervised fine-tuning of the LM on the kept (state, command) pairs (TRL's SFTTrainer);
8. benchmark after, on the same test games, and the paired change with a bootstrap interval.

The LM acts by ranking the admissible commands by their likelihood under its chat prompt
(:func:`likelihood_policy`): a 135M model asked for free text almost never writes an admissible
command, but it does prefer some commands to others, and fine-tuning moves that preference.
Candidates for Best-of-N are all admissible commands of a state (TextWorld's action sets are
small, so N = |admissible| replaces Digi-Q's N sampled candidates).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from llmq.errors import UserError


@dataclasses.dataclass
class DigiQRunConfig:
    """Games, behaviour data, features and critic of a Digi-Q run; the actor's fine-tuning takes the
    usual training arguments (learning_rate, num_train_epochs, per_device_train_batch_size, ...)."""

    method: str = dataclasses.field(default="digiq", metadata={"help": "digiq.", "choices": ["digiq"]})
    games_dir: str = dataclasses.field(default="outputs/textworld_games", metadata={"help": "Where generated games are kept (reused when present)."})
    train_games: int = dataclasses.field(default=20, metadata={"help": "Games whose episodes make the offline data (seeds train_seed, train_seed + 1, ...)."})
    test_games: int = dataclasses.field(default=20, metadata={"help": "Held-out games of the before/after benchmark (seeds test_seed, ...)."})
    train_seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the first train game."})
    test_seed: int = dataclasses.field(default=10_000, metadata={"help": "Seed of the first test game (disjoint from the train seeds)."})
    world_size: int = dataclasses.field(default=1, metadata={"help": "Rooms per game."})
    nb_objects: int = dataclasses.field(default=3, metadata={"help": "Objects per game."})
    quest_length: int = dataclasses.field(default=2, metadata={"help": "Actions a quest needs."})
    episode_steps: int = dataclasses.field(default=10, metadata={"help": "Steps per episode (the game is lost after them)."})
    episodes_per_game: int = dataclasses.field(default=4, metadata={"help": "Behaviour episodes per train game."})
    behaviour_temperature: float = dataclasses.field(default=1.0, metadata={"help": "Temperature of the base LM's command distribution while collecting data."})
    feature_layer: int | None = dataclasses.field(default=None, metadata={"help": "Hidden-state index of the features; default the middle layer."})
    gamma: float = dataclasses.field(default=0.95, metadata={"help": "Discount per step (Digi-Q: 0.95)."})
    critic_steps: int = dataclasses.field(default=2000, metadata={"help": "Optimizer steps of the critic."})
    critic_learning_rate: float = dataclasses.field(default=1e-4, metadata={"help": "Adam learning rate of the critic heads."})
    critic_batch_size: int = dataclasses.field(default=64, metadata={"help": "Transitions per critic step."})
    critic_hidden_size: int = dataclasses.field(default=256, metadata={"help": "Width of the critic heads."})
    critic_layers: int = dataclasses.field(default=2, metadata={"help": "Hidden layers per critic head."})
    representation_steps: int = dataclasses.field(
        default=0,
        metadata={"help": "Representation fine-tuning (§5.4) before the features: LoRA steps on 'does this command change the game?' yes/no labels from the data; 0 skips it."},
    )
    representation_learning_rate: float = dataclasses.field(default=1e-4, metadata={"help": "Learning rate of the representation fine-tuning."})
    representation_lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank of the representation fine-tuning (merged into a copy of the backbone afterwards)."})
    target_update_rate: float = dataclasses.field(default=0.1, metadata={"help": "Polyak rate of the target heads."})
    target_update_steps: int = dataclasses.field(default=10, metadata={"help": "Critic steps between target updates."})
    expectile: float | None = dataclasses.field(default=None, metadata={"help": "None: Digi-Q's MSE values (behaviour values); in (0.5, 1): expectile V."})
    threshold: float = dataclasses.field(default=0.05, metadata={"help": "Best-of-N extraction keeps a state's best command when its advantage exceeds this."})
    policy_batch_size: int = dataclasses.field(default=8, metadata={"help": "States scored per forward batch by the likelihood policy."})

    def __post_init__(self) -> None:
        for name in ("train_games", "test_games", "episode_steps", "episodes_per_game", "critic_steps", "critic_batch_size", "policy_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"key '{name}' must be at least 1, got {getattr(self, name)}")
        if self.behaviour_temperature <= 0:
            raise UserError("key 'behaviour_temperature' must be > 0: the behaviour policy must explore")
        if not 0 < self.gamma <= 1:
            raise UserError(f"key 'gamma' must be in (0, 1], got {self.gamma}")


def command_logprobs(model, tokenizer, states: list[str], admissible: list[list[str]], batch_size: int = 8) -> list[list[float]]:
    """``log π(command ⊕ end-of-turn | chat prompt)`` of every admissible command of every state.

    The prompt is :func:`llmq.envs.textworld.policy_prompt` through the chat template, read once
    per state (:func:`llmq.models.features.score_continuations`); the end-of-turn token makes a
    command's score that of the whole reply, not of a prefix.
    """
    from llmq.envs.textworld import policy_prompt
    from llmq.models.features import score_continuations

    prompts = [tokenizer.apply_chat_template(policy_prompt(state, commands), tokenize=False, add_generation_prompt=True) for state, commands in zip(states, admissible)]
    replies = [[command + (tokenizer.eos_token or "") for command in commands] for commands in admissible]
    _, _, logprobs = score_continuations(model, tokenizer, prompts, replies, batch_size=batch_size, progress=False)
    return [scores.tolist() for scores in logprobs]


def likelihood_policy(model, tokenizer, *, temperature: float = 0.0, seed: int = 0, batch_size: int = 8):
    """A TextWorld policy that picks an admissible command by the LM's likelihood of it:
    the most likely one (``temperature`` 0) or a sample from ``softmax(log π / temperature)``."""
    rng = np.random.default_rng(seed)

    def policy(states: list[str], admissible: list[list[str]]) -> list[str]:
        chosen = []
        for commands, scores in zip(admissible, command_logprobs(model, tokenizer, states, admissible, batch_size)):
            if temperature == 0:
                chosen.append(commands[int(np.argmax(scores))])
            else:
                weights = np.exp((np.asarray(scores) - max(scores)) / temperature)
                chosen.append(commands[rng.choice(len(commands), p=weights / weights.sum())])
        return chosen

    return policy


# A state's text followed by this and a command stands for taking that command (Digi-Q's q_rep input).
ACTION_SEPARATOR = "\n\nAction: "


ACTIONABILITY_QUESTION = "Will this command change the state of the game (what is here or what you carry)? Answer Yes or No."


def actionability_rows(data) -> list[dict]:
    """Digi-Q's representation task (§5.4) for text games: a (state, command) pair is labelled "Yes"
    when the world changed after it — the command scored, or the next state's admissible commands
    differ (taking, opening or moving changes them) —, else "No"; labelled automatically from the
    logged transitions.  The last step of an episode is labelled only when it scored."""
    rows = []
    for t, r in enumerate(data):
        following = data[t + 1] if t + 1 < len(data) and not r["done"] else None
        if following is None and r["reward"] <= 0:
            continue
        changed = r["reward"] > 0 or sorted(following["admissible"]) != sorted(r["admissible"])
        prompt = f"{r['state']}{ACTION_SEPARATOR}{r['action']}\n\n{ACTIONABILITY_QUESTION}"
        rows.append({"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": "Yes" if changed else "No"}]})
    return rows


def representation_backbone(model, tokenizer, data, run: DigiQRunConfig, training_args, output_dir: Path):
    """A copy of the backbone LoRA-tuned on :func:`actionability_rows` and merged, frozen for the features."""
    import copy

    import datasets
    from peft import LoraConfig
    from trl import SFTTrainer

    from llmq.trainers import SFTConfig

    rows = actionability_rows(data)
    if not rows:
        raise UserError("representation fine-tuning found no labelled transition; set representation_steps: 0 or collect more data")
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=run.representation_steps,
        learning_rate=run.representation_learning_rate,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        logging_steps=max(1, run.representation_steps // 10),
        save_strategy="no",
        report_to=training_args.report_to,
        use_cpu=training_args.use_cpu,
        seed=training_args.seed,
        disable_tqdm=training_args.disable_tqdm,
    )
    lora = LoraConfig(r=run.representation_lora_r, lora_alpha=2 * run.representation_lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=copy.deepcopy(model), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    labels = [row["completion"][0]["content"] for row in rows]
    stats = {"rows": len(rows), "yes_fraction": labels.count("Yes") / len(labels), "train_loss": result.metrics.get("train_loss")}
    return trainer.model.merge_and_unload().eval(), stats


# What a Digi-Q run has done so far: its configuration and each finished stage's report, rewritten
# after every stage so that ``llmq train --resume`` continues a killed run where it stopped.
STAGES_FILE = "stages.json"


def fit_critic_and_extract(model, tokenizer, data, run: DigiQRunConfig, training_args, output_dir: Path, record) -> list[dict]:
    """Steps 4–6: features (after the optional representation fine-tuning), the critic's TD fit and
    Best-of-N extraction; returns the kept (prompt, completion) rows and records each stage's report."""
    import datasets

    from llmq.envs.textworld import policy_prompt
    from llmq.losses import best_of_n_advantages
    from llmq.models.features import score_continuations
    from llmq.trainers.digiq import DigiQCriticTrainer, critic_config

    # Features of every state and of every (state, admissible command): each state's text is read
    # once, its commands continue it through the KV cache.
    actions_of: dict[str, set[str]] = {text: set() for text in {*data["state"], *data["next_state"]}}
    for r in data:
        actions_of[r["state"]].update([*r["admissible"], r["action"]])
    texts = sorted(actions_of)
    options = [sorted(actions_of[text]) for text in texts]
    backbone = model
    if run.representation_steps > 0:
        backbone, stats = representation_backbone(model, tokenizer, data, run, training_args, output_dir / "representation")
        record("representation", stats)
        print(f"representation fine-tuning: {stats}", flush=True)
    state_features, action_features, _ = score_continuations(
        backbone, tokenizer, texts, [[ACTION_SEPARATOR + command for command in commands] for commands in options], layer=run.feature_layer, cache_dir=output_dir / "features"
    )
    state_row = {text: i for i, text in enumerate(texts)}
    action_row = {(text, command): (i, j) for i, (text, commands) in enumerate(zip(texts, options)) for j, command in enumerate(commands)}

    def feature(text: str) -> list[float]:
        return state_features[state_row[text]].tolist()

    def action_feature(text: str, command: str) -> list[float]:
        i, j = action_row[(text, command)]
        return action_features[i][j].tolist()

    transitions = datasets.Dataset.from_list(
        [
            {"state_features": feature(r["state"]), "action_features": action_feature(r["state"], r["action"]), "next_state_features": feature(r["next_state"]),
             "reward": r["reward"], "done": r["done"] and not r["truncated"]}  # fmt: skip
            for r in data
        ]
    )
    critic_args = critic_config(
        training_args,
        str(output_dir / "critic"),
        run.critic_steps,
        gamma=run.gamma,
        target_update_rate=run.target_update_rate,
        target_update_steps=run.target_update_steps,
        expectile=run.expectile,
        hidden_size=run.critic_hidden_size,
        num_layers=run.critic_layers,
        learning_rate=run.critic_learning_rate,
        per_device_train_batch_size=run.critic_batch_size,
    )
    critic_trainer = DigiQCriticTrainer(args=critic_args, train_dataset=transitions)
    critic_result = critic_trainer.train()
    critic_trainer.save_model(str(output_dir / "critic"))
    critic = critic_trainer.model.online.cpu().eval()
    record("critic", dict(critic_result.metrics) | {"log": [e for e in critic_trainer.state.log_history if "td_error/abs_mean" in e][-1:]})

    # Best-of-N extraction over each logged state's admissible commands.
    rows, advantages = [], []
    with torch.no_grad():
        for r in data:
            commands = list(r["admissible"])
            state = torch.tensor([feature(r["state"])])
            candidates = torch.tensor([[action_feature(r["state"], c) for c in commands]])
            best, advantage, weight = best_of_n_advantages(critic.q(state, candidates), critic.v(state), threshold=run.threshold)
            advantages.append(advantage.item())
            if weight.item() == 1:
                rows.append({"prompt": policy_prompt(r["state"], commands), "completion": [{"role": "assistant", "content": commands[best.item()]}]})
    print(f"Best-of-N extraction: kept {len(rows)} of {len(data)} states (mean best advantage {np.mean(advantages):.3f})", flush=True)
    if not rows:
        raise UserError(f"Best-of-N extraction kept no state (no advantage above threshold {run.threshold}); lower 'threshold' or collect more data")
    datasets.Dataset.from_list(rows).save_to_disk(str(output_dir / "extracted"))
    record("extraction", {"states": len(data), "kept": len(rows), "advantage_mean": float(np.mean(advantages)), "threshold": run.threshold})
    return rows


def run_digiq(model_args, training_args, run: DigiQRunConfig, resume: bool = False) -> dict:
    """Run Digi-Q end to end; returns the summary written to ``output_dir/summary.json``.

    With ``resume`` the stages recorded in ``output_dir/stages.json`` by an earlier run of the same
    configuration are not run again (their data is read back from ``output_dir``), and the actor's
    fine-tuning continues from ``training_args.resume_from_checkpoint``.
    """
    import datasets
    from trl import SFTTrainer, get_peft_config

    from llmq.envs.textworld import collect_trajectories, evaluate_agent, make_games
    from llmq.evaluation import bootstrap_interval
    from llmq.models import load_from_config

    started = time.perf_counter()
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stages_path = output_dir / STAGES_FILE
    configuration = json.loads(json.dumps({"model": model_args.model_name_or_path, "seed": training_args.seed, "run": dataclasses.asdict(run)}))
    stages: dict = {"configuration": configuration}
    if resume and stages_path.exists():
        stages = json.loads(stages_path.read_text())
        if stages.get("configuration") != configuration:
            earlier = stages.get("configuration", {})
            changed = sorted(k for k in configuration["run"] if configuration["run"][k] != earlier.get("run", {}).get(k))
            changed += [k for k in ("model", "seed") if configuration[k] != earlier.get(k)]
            raise UserError(f"{stages_path} is the record of a run with other settings ({', '.join(changed) or 'unreadable'}): "
                            "resume with the same recipe, or use a new output_dir")  # fmt: skip
        print(f"resuming Digi-Q after the stages {', '.join(k for k in stages if k != 'configuration')} of {stages_path}", flush=True)

    def record(stage: str, report: dict) -> dict:
        stages[stage] = report
        stages_path.write_text(json.dumps(stages, indent=2, default=str) + "\n")
        return report

    settings = dict(world_size=run.world_size, nb_objects=run.nb_objects, quest_length=run.quest_length)
    train_games = make_games(run.games_dir, run.train_games, run.train_seed, **settings)
    test_games = make_games(run.games_dir, run.test_games, run.test_seed, **settings)
    model, tokenizer = load_from_config(model_args, device="cpu" if training_args.use_cpu else training_args.device)
    model.eval()
    summary: dict = {"model": model_args.model_name_or_path, "method": "digiq", "train_games": len(train_games), "test_games": len(test_games)}

    def benchmark(stage: str) -> dict:
        report = evaluate_agent(likelihood_policy(model, tokenizer, batch_size=run.policy_batch_size), test_games, run.episode_steps, seed=run.test_seed)
        print(f"{stage}: success {100 * report['success_rate']:.1f}% (95% CI {100 * report['success_rate_ci95'][0]:.1f}–{100 * report['success_rate_ci95'][1]:.1f}), "
              f"normalised score {report['normalized_score']:.3f} on {len(test_games)} test games", flush=True)  # fmt: skip
        return report

    summary["before"] = stages["before"] if "before" in stages else record("before", benchmark("before"))
    if "data" in stages:
        data = datasets.load_from_disk(str(output_dir / "trajectories"))
    else:
        behaviour = likelihood_policy(model, tokenizer, temperature=run.behaviour_temperature, seed=training_args.seed, batch_size=run.policy_batch_size)
        data = collect_trajectories(behaviour, train_games, run.episodes_per_game, run.episode_steps, seed=training_args.seed, gamma=run.gamma)
        data.save_to_disk(str(output_dir / "trajectories"))
        record("data", {"transitions": len(data), "episodes": len(train_games) * run.episodes_per_game, "won_episodes": int(sum(r["won"] for r in data if r["done"])),
                        "mean_reward": float(np.mean(data["reward"]))})  # fmt: skip
    print(f"offline data: {stages['data']}", flush=True)
    if "extraction" in stages:
        rows = datasets.load_from_disk(str(output_dir / "extracted")).to_list()
    else:
        rows = fit_critic_and_extract(model, tokenizer, data, run, training_args, output_dir, record)
    summary |= {stage: stages[stage] for stage in ("data", "representation", "critic", "extraction") if stage in stages}

    model.train()
    actor = SFTTrainer(model=model, args=training_args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer, peft_config=get_peft_config(model_args))
    summary["actor"] = dict(actor.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics)
    actor.save_model(str(output_dir))
    model = actor.model.eval()

    summary["after"] = benchmark("after")
    change = {}
    for metric, key in (("success_rate", "won"), ("normalized_score", "normalized_score")):
        difference = np.array([float(a[key]) - float(b[key]) for a, b in zip(summary["after"]["games"], summary["before"]["games"])])
        low, high = bootstrap_interval(difference, seed=training_args.seed)
        change[metric] = {"mean": float(difference.mean()), "ci95_paired": [low, high]}
        print(f"change after digiq, {metric}: {difference.mean():+.3f} (paired 95% CI {low:+.3f} to {high:+.3f})", flush=True)
    summary["change"] = change
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
