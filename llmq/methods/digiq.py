"""``llmq train`` with ``method: digiq``: Digi-Q on text games (§5): TextWorld or TextWorldExpress.

1. games: seeded TextWorld train and test sets (:func:`llmq.envs.textworld.make_games`), or a TextWorldExpress
   benchmark's train and test folds (:func:`llmq.envs.textworld_express.fold_games`) — ``benchmark``;
2. benchmark before: the base LM plays every test game greedily;
3. offline data: the base LM plays the train games, sampling its commands (the behaviour policy);
4. (optional, ``representation_steps``) representation fine-tuning of a copy of the backbone on
   automatically labelled "does this command change the game?" yes/no questions (§5.4), then
   frozen features of every state and every (state, admissible command) pair, computed once
   (:func:`llmq.models.features.score_continuations`: a state read once, its commands through the KV cache; cached on
   disk);
5. critic: double Q/V heads fitted by TD on the logged actions (:class:`~llmq.trainers.critic.CriticTrainer`);
6. Best-of-N extraction: in every logged state, the admissible command with the largest
   ``max Q − max V`` is kept when that advantage exceeds ``threshold`` (:func:`best_of_n_advantages`);
7. actor: supervised fine-tuning of the LM on the kept (state, command) pairs (TRL's SFTTrainer);
8. benchmark after, on the same test games, and the paired change with a bootstrap interval.

The LM acts by ranking the admissible commands by their likelihood under its chat prompt
(:func:`llmq.envs.textworld.likelihood_policy`): a 135M model asked for free text almost never writes an admissible
command, but it does prefer some commands to others, and fine-tuning moves that preference.
Candidates for Best-of-N are all admissible commands of a state (TextWorld's action sets are
small, so N = |admissible| replaces Digi-Q's N sampled candidates).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from peft import LoraConfig, PeftModel
from trl import SFTTrainer, get_peft_config

from llmq.config import ModelConfig, mirror
from llmq.errors import UserError
from llmq.launch import LaunchConfig
from llmq.losses import best_of_n_advantages
from llmq.methods import method_field
from llmq.methods.stages import StageLedger, paired_change, write_summary
from llmq.models import load_from_config
from llmq.models.features import score_continuations
from llmq.rollout.engines import EngineConfig
from llmq.trainers import SFTConfig
from llmq.trainers.critic import CriticConfig, CriticTrainer, critic_config


@dataclasses.dataclass
class Config(EngineConfig):
    """Games, behaviour data, features and critic of a Digi-Q run; the actor's fine-tuning takes the
    usual training arguments (learning_rate, num_train_epochs, per_device_train_batch_size, ...).
    The critic's keys set the fields of :class:`~llmq.trainers.critic.CriticConfig` of the same name
    (without ``critic_``), with its defaults.  Every stage runs on transformers (``engine: hf``): the
    policy scores a state's admissible commands through the state's KV cache, and the same pass gives
    the critic's features, which no vLLM API returns."""

    method: str = method_field("digiq")
    benchmark: str = dataclasses.field(
        default="textworld",
        metadata={
            "help": "textworld: TextWorld games generated from seeds (games_dir, train_seed, test_seed, rooms, "
            "nb_objects, quest_length); cookingworld, twc or coin: a TextWorldExpress benchmark, the first "
            "train_games of its train fold and the first test_games of its test fold, generated with game_params."
        },
    )
    game_params: str = dataclasses.field(
        default="",
        metadata={
            "help": "TextWorldExpress generation parameters, e.g. 'numLocations=1,includeDoors=0' (empty: the "
            "benchmark's defaults)."
        },
    )
    observations: str = dataclasses.field(
        default="text",
        metadata={
            "help": "text: the agent reads each state as text; screen: the current observation is an image of the "
            "game's screen beside the text of the goal and previous actions (a vision-language backbone: policy, "
            "features and actor all see the image)."
        },
    )
    games_dir: str = dataclasses.field(
        default="outputs/textworld_games", metadata={"help": "Where generated games are kept (reused when present)."}
    )
    train_games: int = dataclasses.field(
        default=20,
        metadata={"help": "Games whose episodes make the offline data (seeds train_seed, train_seed + 1, ...)."},
    )
    test_games: int = dataclasses.field(
        default=20, metadata={"help": "Held-out games of the before/after benchmark (seeds test_seed, ...)."}
    )
    train_seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the first train game."})
    test_seed: int = dataclasses.field(
        default=10_000, metadata={"help": "Seed of the first test game (disjoint from the train seeds)."}
    )
    rooms: int = dataclasses.field(default=1, metadata={"help": "Rooms per game."})
    nb_objects: int = dataclasses.field(default=3, metadata={"help": "Objects per game."})
    quest_length: int = dataclasses.field(default=2, metadata={"help": "Actions a quest needs."})
    episode_steps: int = dataclasses.field(
        default=10, metadata={"help": "Steps per episode (the game is lost after them)."}
    )
    episodes_per_game: int = dataclasses.field(default=4, metadata={"help": "Behaviour episodes per train game."})
    behaviour_temperature: float = dataclasses.field(
        default=1.0, metadata={"help": "Temperature of the base LM's command distribution while collecting data."}
    )
    feature_layer: int | None = dataclasses.field(
        default=None, metadata={"help": "Hidden-state index of the features; default the middle layer."}
    )
    gamma: float = mirror(CriticConfig, "gamma")
    critic_steps: int = dataclasses.field(default=2000, metadata={"help": "Optimizer steps of the critic."})
    critic_learning_rate: float = mirror(CriticConfig, "learning_rate")
    critic_batch_size: int = dataclasses.field(default=64, metadata={"help": "Transitions per critic step."})
    critic_hidden_size: int = mirror(CriticConfig, "hidden_size")
    critic_layers: int = mirror(CriticConfig, "num_layers")
    representation_steps: int = dataclasses.field(
        default=0,
        metadata={
            "help": "Representation fine-tuning (§5.4) before the features: LoRA steps on 'does this command change "
            "the game?' yes/no labels from the data; 0 skips it."
        },
    )
    representation_learning_rate: float = dataclasses.field(
        default=1e-4, metadata={"help": "Learning rate of the representation fine-tuning."}
    )
    representation_lora_r: int = dataclasses.field(
        default=16,
        metadata={
            "help": "LoRA rank of the representation fine-tuning (merged into a copy of the backbone afterwards)."
        },
    )
    target_update_rate: float = mirror(CriticConfig, "target_update_rate")
    target_update_steps: int = mirror(CriticConfig, "target_update_steps")
    expectile: float | None = mirror(CriticConfig, "expectile")
    threshold: float = dataclasses.field(
        default=0.05,
        metadata={"help": "Best-of-N extraction keeps a state's best command when its advantage exceeds this."},
    )
    policy_batch_size: int = dataclasses.field(
        default=8, metadata={"help": "States scored per forward batch by the likelihood policy."}
    )

    def __post_init__(self) -> None:
        self.check_engine()
        if self.engine != "hf":
            raise UserError(
                f"key 'engine': method digiq runs on transformers (engine hf), not engine {self.engine}: it scores "
                "commands and reads features through one KV cache"
            )
        for name in (
            "train_games",
            "test_games",
            "episode_steps",
            "episodes_per_game",
            "critic_steps",
            "critic_batch_size",
            "policy_batch_size",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"key '{name}' must be at least 1, got {getattr(self, name)}")
        if self.benchmark not in BENCHMARKS:
            raise UserError(f"key 'benchmark': {self.benchmark!r} is not one of {', '.join(BENCHMARKS)}")
        if self.benchmark == "textworld" and self.game_params:
            raise UserError("key 'game_params' sets TextWorldExpress games; benchmark textworld generates its own")
        if self.observations not in ("text", "screen"):
            raise UserError(f"key 'observations': {self.observations!r} is not one of text, screen")
        if self.observations == "screen" and self.representation_steps > 0:
            raise UserError(
                "keys 'observations' screen and 'representation_steps': the representation fine-tuning reads text "
                "states; set representation_steps: 0 with screen observations"
            )
        if self.behaviour_temperature <= 0:
            raise UserError("key 'behaviour_temperature' must be > 0: the behaviour policy must explore")
        if not 0 < self.gamma <= 1:
            raise UserError(f"key 'gamma' must be in (0, 1], got {self.gamma}")

    def critic_args(self, training_args: SFTConfig, output_dir: Path) -> CriticConfig:
        """The critic's training arguments: this run's ``critic_*`` keys and ``gamma``, the device, seed and logging
        of ``training_args``."""
        return critic_config(
            training_args,
            str(output_dir),
            self.critic_steps,
            gamma=self.gamma,
            target_update_rate=self.target_update_rate,
            target_update_steps=self.target_update_steps,
            expectile=self.expectile,
            hidden_size=self.critic_hidden_size,
            num_layers=self.critic_layers,
            learning_rate=self.critic_learning_rate,
            per_device_train_batch_size=self.critic_batch_size,
        )


BENCHMARKS = ("textworld", "cookingworld", "twc", "coin")


def benchmark_games(config: Config) -> tuple[list, list]:
    """The train and test games of a run's benchmark (:data:`llmq.envs.textworld.Game`)."""
    if config.benchmark == "textworld":
        from llmq.envs.textworld import make_games  # an optional extra (llmq[agents])

        games = dict(rooms=config.rooms, nb_objects=config.nb_objects, quest_length=config.quest_length)
        return (
            make_games(config.games_dir, config.train_games, config.train_seed, **games),
            make_games(config.games_dir, config.test_games, config.test_seed, **games),
        )
    from llmq.envs.textworld_express import fold_games  # TextWorldExpress is an optional extra (llmq[agents])

    try:
        return (
            fold_games(config.benchmark, "train", config.train_games, config.game_params),
            fold_games(config.benchmark, "test", config.test_games, config.game_params),
        )
    except RuntimeError as error:  # no Java
        raise UserError(str(error)) from None


def config_types(method: str) -> tuple[type, type]:
    """The actor's training arguments (TRL's SFT) and the run's config."""
    return SFTConfig, Config


# A state's text followed by this and a command stands for taking that command (Digi-Q's q_rep input).
ACTION_SEPARATOR = "\n\nAction: "


ACTIONABILITY_QUESTION = (
    "Will this command change the state of the game (what is here or what you carry)? Answer Yes or No."
)


def actionability_question(state: str, command: str) -> str:
    """The user turn of the representation task (§5.4): the state, the command, and the yes/no question."""
    return f"{state}{ACTION_SEPARATOR}{command}\n\n{ACTIONABILITY_QUESTION}"


def actionability_prompts(
    tokenizer, state: str, commands: list[str], *, screens: bool = False
) -> tuple[str, list[str]]:
    """The chat-templated representation prompts of ``state`` and each command, split into their shared prefix and
    one continuation per command: ``prefix + continuation`` is the prompt the representation fine-tuning trains on,
    up to the assistant's yes/no answer.  The prefix ends at "Action:", so each continuation starts with the space
    before its command (" take key"), the token boundary of the whole prompt.  With ``screens`` the state's current
    observation is its screen image (the prompt holds the processor's image placeholder)."""
    from llmq.envs.textworld import chat_turn, screen_text  # an optional extra (llmq[agents])

    marker = "\x00COMMAND\x00"
    text = screen_text(state) if screens else state
    rendered = tokenizer.apply_chat_template(
        [chat_turn("user", actionability_question(text, marker), parts=screens, image=screens)],
        tokenize=False,
        add_generation_prompt=True,
    )
    before, suffix = rendered.split(marker)
    prefix = before.removesuffix(" ")
    return prefix, [before[len(prefix) :] + command + suffix for command in commands]


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
        rows.append(
            {
                "prompt": [{"role": "user", "content": actionability_question(r["state"], r["action"])}],
                "completion": [{"role": "assistant", "content": "Yes" if changed else "No"}],
            }
        )
    return rows


def representation_backbone(
    model, tokenizer, data: datasets.Dataset, run: Config, training_args: SFTConfig, output_dir: Path
) -> tuple:
    """A copy of the backbone LoRA-tuned on :func:`actionability_rows` and merged, frozen for the features;
    the adapter is saved in ``output_dir/adapter`` for :func:`saved_representation_backbone`."""
    rows = actionability_rows(data)
    if not rows:
        raise UserError(
            "representation fine-tuning found no labelled transition; set representation_steps: 0 or collect more data"
        )
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
    lora = LoraConfig(
        r=run.representation_lora_r,
        lora_alpha=2 * run.representation_lora_r,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
    result = trainer.train()
    trainer.model.save_pretrained(output_dir / "adapter")
    labels = [row["completion"][0]["content"] for row in rows]
    stats = {
        "rows": len(rows),
        "yes_fraction": labels.count("Yes") / len(labels),
        "train_loss": result.metrics.get("train_loss"),
    }
    return trainer.model.merge_and_unload().eval(), stats


def saved_representation_backbone(model, output_dir: Path):
    """The backbone of :func:`representation_backbone` rebuilt from its saved adapter, or None if none was saved."""
    adapter = output_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        return None
    return PeftModel.from_pretrained(copy.deepcopy(model), adapter).merge_and_unload().eval()


def fit_critic_and_extract(
    model,
    tokenizer,
    data: datasets.Dataset,
    run: Config,
    training_args: SFTConfig,
    output_dir: Path,
    ledger: StageLedger,
) -> list[dict]:
    """Steps 4–6: frozen features (after the optional representation fine-tuning), the critic's TD
    fit and Best-of-N extraction; returns the kept (prompt, completion) rows and records each stage."""
    backbone = model
    if run.representation_steps > 0:
        saved = (  # read only when resuming a recorded stage: the fine-tuning is not run again
            saved_representation_backbone(model, output_dir / "representation") if "representation" in ledger else None
        )
        if saved is not None:
            backbone = saved
        else:
            backbone, stats = representation_backbone(
                model, tokenizer, data, run, training_args, output_dir / "representation"
            )
            print(f"representation fine-tuning: {ledger.record('representation', stats)}", flush=True)
    screens = run.observations == "screen"
    features = TransitionFeatures(
        backbone, tokenizer, data, run.feature_layer, output_dir / "features", screens=screens
    )
    critic = fit_critic(features, data, run, training_args, output_dir / "critic", ledger)
    rows = extract_best_of_n(critic, features, data, run.threshold, ledger, screens=screens)
    datasets.Dataset.from_list(rows).save_to_disk(str(output_dir / "extracted"))
    return rows


class TransitionFeatures:
    """Frozen features of every logged state and of every (state, admissible command), read the way the
    representation fine-tuning trains (§5.4): in the chat-templated actionability prompt
    (:func:`actionability_prompts`), a (state, command) at the prompt's last token, where the yes/no answer
    is predicted, and a state at the last token before its command.  Each state's prefix is read once, its
    commands continue it through the KV cache (cached on disk)."""

    def __init__(
        self,
        backbone,
        tokenizer,
        data: datasets.Dataset,
        layer: int | None,
        cache_dir: Path,
        *,
        screens: bool = False,
    ) -> None:
        actions_of: dict[str, set[str]] = {text: set() for text in {*data["state"], *data["next_state"]}}
        for r in data:
            actions_of[r["state"]].update([*r["admissible"], r["action"]])
        texts = sorted(actions_of)
        options = [sorted(actions_of[text]) for text in texts]
        prompts = [actionability_prompts(tokenizer, t, c, screens=screens) for t, c in zip(texts, options)]
        if screens:
            from llmq.envs.textworld import screen_image  # an optional extra (llmq[agents])

            images = [screen_image(text) for text in texts]
        else:
            images = None
        prefixes, continuations = zip(*prompts)
        self.states, self.actions, _ = score_continuations(
            backbone, tokenizer, list(prefixes), list(continuations), images=images, layer=layer, cache_dir=cache_dir
        )
        self.state_row = {text: i for i, text in enumerate(texts)}
        self.action_row = {
            (text, command): (i, j)
            for i, (text, commands) in enumerate(zip(texts, options))
            for j, command in enumerate(commands)
        }

    def state(self, text: str) -> list[float]:
        return self.states[self.state_row[text]].tolist()

    def action(self, text: str, command: str) -> list[float]:
        i, j = self.action_row[(text, command)]
        return self.actions[i][j].tolist()


def critic_transitions(features: TransitionFeatures, data) -> list[dict]:
    """The critic's rows of the logged steps (§5.2): features, reward and the TD target's terminal flag.

    An episode's last step is terminal — a win, a loss, or the game's step budget spent — unless it was
    cut short (``truncated``) *and* its next state is itself a logged state, whose V̄ the critic trains:
    only then does bootstrapping from V̄(s') estimate what follows. A state the data never starts from
    (on TextWorld, every state after an episode's last step, since the state text holds all previous
    commands) has a V̄ that is pure extrapolation."""
    logged_states = set(data["state"])
    return [
        {
            "state_features": features.state(r["state"]),
            "action_features": features.action(r["state"], r["action"]),
            "next_state_features": features.state(r["next_state"]),
            "reward": r["reward"],
            "done": r["done"] and not (r["truncated"] and r["next_state"] in logged_states),
        }
        for r in data
    ]


def fit_critic(
    features: TransitionFeatures,
    data: datasets.Dataset,
    run: Config,
    training_args: SFTConfig,
    output_dir: Path,
    ledger: StageLedger,
):
    """Double Q/V heads fitted by TD on the logged commands (§5.5); returns the online heads."""
    transitions = datasets.Dataset.from_list(critic_transitions(features, data))
    trainer = CriticTrainer(args=run.critic_args(training_args, output_dir), train_dataset=transitions)
    result = trainer.train()
    trainer.save_model(str(output_dir))
    ledger.record(
        "critic",
        dict(result.metrics) | {"log": [e for e in trainer.state.log_history if "td_error/abs_mean" in e][-1:]},
    )
    return trainer.model.online.cpu().eval()


def extract_best_of_n(
    critic,
    features: TransitionFeatures,
    data: datasets.Dataset,
    threshold: float,
    ledger: StageLedger,
    *,
    screens: bool = False,
) -> list[dict]:
    """Best-of-N extraction (§5.6) over each logged state's admissible commands: the one with the
    largest ``max Q − max V``, kept when that advantage exceeds ``threshold``; the kept (state, command) pairs as
    the actor's examples (with the state's screen when ``screens``)."""
    from llmq.envs.textworld import policy_example  # TextWorld is an optional extra (llmq[agents])

    rows, advantages = [], []
    with torch.no_grad():
        for r in data:
            commands = list(r["admissible"])
            state = torch.tensor([features.state(r["state"])])
            candidates = torch.tensor([[features.action(r["state"], c) for c in commands]])
            best, advantage, weight = best_of_n_advantages(
                critic.q(state, candidates), critic.v(state), threshold=threshold
            )
            advantages.append(advantage.item())
            if weight.item() == 1:
                rows.append(policy_example(r["state"], commands, commands[best.item()], screens=screens))
    print(
        f"Best-of-N extraction: kept {len(rows)} of {len(data)} states (mean best advantage "
        f"{np.mean(advantages):.3f})",
        flush=True,
    )
    if not rows:
        raise UserError(
            f"Best-of-N extraction kept no state (no advantage above threshold {threshold}); lower 'threshold' or "
            "collect more data"
        )
    ledger.record(
        "extraction",
        {"states": len(data), "kept": len(rows), "advantage_mean": float(np.mean(advantages)), "threshold": threshold},
    )
    return rows


def check_actor_lengths(tokenizer, rows: list[dict], max_length: int) -> None:
    """Refuse actor examples longer than ``max_length`` tokens: TRL's SFTTrainer would cut their commands off and then
    drop them without a word (long text-game states, e.g. TextWorldExpress rooms, reach it)."""
    lengths = [
        len(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False))
        for row in rows
    ]
    too_long = sum(length > max_length for length in lengths)
    if too_long:
        raise UserError(
            f"key 'max_length': {too_long} of {len(rows)} actor examples are longer than {max_length} tokens (the "
            f"longest {max(lengths)}); raise max_length"
        )


def run(model_args: ModelConfig, training_args: SFTConfig, config: Config, launch: LaunchConfig, argv=()) -> dict:
    """Run Digi-Q end to end; returns the summary written to ``output_dir/summary.json``.

    With ``launch.resume`` the stages recorded in ``output_dir/stages.json`` by an earlier run of
    the same settings are not run again (their data is read back from ``output_dir``), and the
    actor's fine-tuning continues from ``training_args.resume_from_checkpoint``.
    """
    # TextWorld is an optional extra (llmq[agents]): only this method needs it.
    from llmq.envs.textworld import collect_trajectories, evaluate_agent, likelihood_policy

    started = time.perf_counter()
    output_dir = Path(training_args.output_dir)
    ledger = StageLedger(
        output_dir,
        {"model": model_args.model_name_or_path, "seed": training_args.seed, **config.settings_record()},
        resume=launch.resume,
    )
    train_games, test_games = benchmark_games(config)
    model, tokenizer = load_from_config(model_args, device="cpu" if training_args.use_cpu else training_args.device)
    model.eval()
    screens = config.observations == "screen"
    if screens and not hasattr(tokenizer, "image_processor"):
        raise UserError(
            f"key 'observations' screen: model '{model_args.model_name_or_path}' reads no images; use a "
            "vision-language model (e.g. HuggingFaceTB/SmolVLM-256M-Instruct) or observations: text"
        )
    summary: dict = {
        "model": model_args.model_name_or_path,
        "method": "digiq",
        "benchmark": config.benchmark,
        "observations": config.observations,
        "train_games": len(train_games),
        "test_games": len(test_games),
    }

    def benchmark(stage: str) -> dict:
        report = evaluate_agent(
            likelihood_policy(model, tokenizer, batch_size=config.policy_batch_size, screens=screens),
            test_games,
            config.episode_steps,
            seed=config.test_seed,
        )
        low, high = report["success_rate_ci95"]
        print(
            f"{stage}: success {100 * report['success_rate']:.1f}% (95% CI {100 * low:.1f}–{100 * high:.1f}), "
            f"normalised score {report['normalized_score']:.3f} on {len(test_games)} test games",
            flush=True,
        )
        return report

    def collect() -> dict:
        behaviour = likelihood_policy(
            model,
            tokenizer,
            temperature=config.behaviour_temperature,
            seed=training_args.seed,
            batch_size=config.policy_batch_size,
            screens=screens,
        )
        data = collect_trajectories(
            behaviour,
            train_games,
            config.episodes_per_game,
            config.episode_steps,
            seed=training_args.seed,
            gamma=config.gamma,
        )
        data.save_to_disk(str(output_dir / "trajectories"))
        won = int(sum(r["won"] for r in data if r["done"]))
        return {
            "transitions": len(data),
            "episodes": len(train_games) * config.episodes_per_game,
            "won_episodes": won,
            "mean_reward": float(np.mean(data["reward"])),
        }

    summary["before"] = ledger.run("before", lambda: benchmark("before"))
    print(f"offline data: {ledger.run('data', collect)}", flush=True)
    data = datasets.load_from_disk(str(output_dir / "trajectories"))
    if "extraction" in ledger:
        rows = datasets.load_from_disk(str(output_dir / "extracted")).to_list()
    else:
        rows = fit_critic_and_extract(model, tokenizer, data, config, training_args, output_dir, ledger)
    summary |= {
        stage: ledger[stage] for stage in ("data", "representation", "critic", "extraction") if stage in ledger
    }

    if not screens and training_args.max_length is not None:
        check_actor_lengths(tokenizer, rows, training_args.max_length)
    model.train()
    actor = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    summary["actor"] = dict(actor.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics)
    actor.save_model(str(output_dir))
    model = actor.model.eval()

    summary["after"] = ledger.record("after", benchmark("after"))
    summary["change"] = {
        metric: paired_change(
            [float(g[key]) for g in summary["before"]["games"]],
            [float(g[key]) for g in summary["after"]["games"]],
            metric,
            "digiq",
            training_args.seed,
        )
        for metric, key in (("success_rate", "won"), ("normalized_score", "normalized_score"))
    }
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    return write_summary(output_dir, summary)


def describe(summary: dict, output_dir: str) -> str:
    """The closing line of a run."""
    before, after = summary["before"]["success_rate"], summary["after"]["success_rate"]
    return (
        f"success on test games {100 * before:.1f}% → {100 * after:.1f}%; model saved to {output_dir}; summary: "
        f"{output_dir}/summary.json"
    )
