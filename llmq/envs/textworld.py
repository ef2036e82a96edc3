"""TextWorld text games as a step-level offline-RL benchmark (the Digi-Q setting, docs/algorithms.md §5).

A state is the text the agent sees — the goal, its previous actions and the current observation —
rendered by :func:`render_state`; an action is one free-text command, matched against the game's
admissible commands by :func:`match_command` (no match: a wasted step).  The reward is the score
increase of a step: sparse, usually a single point when the quest is completed.

* :func:`make_games` generates games offline from seeds; a train/test split is two seed ranges.
* :class:`TextWorldEnv` plays one game: ``reset()`` and ``step(text)``.
* :func:`collect_trajectories` plays a policy on several games at once and returns step-level rows
  (state, action, reward, next state, done, Monte-Carlo return, admissible commands).
* :func:`evaluate_agent` reports success rate and normalised score, each with its Wilson 95% interval.

Policies are callables ``(states, admissible) -> actions`` over a batch of parallel games:
:func:`llm_policy` (an llmq engine writes a command), :func:`likelihood_policy` (an LM ranks the
admissible commands by their likelihood), :func:`random_policy` and :func:`walkthrough_policy`.

Example::

    train = make_games("outputs/tw_games", count=200, seed=0)
    test = make_games("outputs/tw_games", count=50, seed=10_000)
    data = collect_trajectories(random_policy(seed=0), train, episodes_per_game=4, max_steps=10)
    report = evaluate_agent(llm_policy(HFEngine(model, tokenizer)), test, max_steps=10)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

try:
    import jericho
    import textworld
    from textworld.generator import compile_game, make_game
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("llmq.envs.textworld needs TextWorld: pip install 'llmq[agents]'") from error

from llmq.models.features import score_continuations
from llmq.rollout import Engine, SamplingParams
from llmq.stats import mean_interval


class SelfOpeningGame(Protocol):
    """A game that opens its own environment (:class:`~llmq.envs.textworld_express.TextWorldExpressGame`)."""

    name: str

    def open(self, max_steps: int, seed: int = 0) -> TextGameEnv: ...


Game = str | Path | SelfOpeningGame
"""A TextWorld story file (:func:`make_games`) or a :class:`SelfOpeningGame`."""

Policy = Callable[[list[str], list[list[str]]], list[str]]
"""``policy(states, admissible) -> actions``: one free-text action per state (a batch of games)."""

INVALID_FEEDBACK = "Invalid action: that is not one of the admissible commands. Nothing happened."

SYSTEM_PROMPT = (
    "You are playing a text adventure game. Read the goal, your previous actions and the current "
    "observation, then reply with exactly one command from the list of admissible commands and nothing else."
)

# Everything the environment reports: description and inventory make the observation Markovian
# (the agent need not spend steps on "look"); the walkthrough drives the oracle policy.
_INFOS = textworld.EnvInfos(
    feedback=True,
    description=True,
    inventory=True,
    objective=True,
    admissible_commands=True,
    score=True,
    max_score=True,
    won=True,
    lost=True,
    extras=["walkthrough"],
)


@contextlib.contextmanager
def _interpreter_warnings_off() -> Iterator[None]:
    """TextWorld's wrapper supplies its games' walkthroughs and admissible commands; the Z-machine
    interpreter underneath warns at every step that it cannot."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jericho.UnsupportedGameWarning)
        yield


_ARTICLES = frozenset({"a", "an", "the"})

# Invalid free text goes into the next states' history; a cap keeps one rambling answer from
# filling every later prompt.
_HISTORY_ENTRY_CHARS = 80


def make_games(
    output_dir: str | Path, count: int, seed: int, *, rooms: int = 1, nb_objects: int = 3, quest_length: int = 2
) -> list[Path]:
    """Generate ``count`` TextWorld games from seeds ``seed, seed + 1, ...`` into ``output_dir``.

    Each game is a story file ``tw-w{rooms}-o{nb_objects}-q{quest_length}-s{seed}.z8`` with its
    ``.json`` metadata beside it; the same seed and settings give the same game, so a train/test
    split is two disjoint seed ranges.  Games already in ``output_dir`` are kept (the story file is
    moved in last, so an interrupted run leaves no half-written game behind).

    Args:
        output_dir: folder of the games; created if missing.
        count: number of games.
        seed: seed of the first game.
        rooms: number of rooms.
        nb_objects: number of objects, quest objects included (distractors fill the rest).
        quest_length: number of actions the quest needs (the walkthrough can be shorter when the
            generated world already satisfies a step).

    Returns:
        The story-file paths, in seed order.
    """
    if count < 0 or rooms < 1 or nb_objects < 0 or quest_length < 1:
        raise ValueError(
            f"invalid game settings: count={count}, rooms={rooms}, nb_objects={nb_objects}, "
            f"quest_length={quest_length}"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    games = []
    for game_seed in range(seed, seed + count):
        path = output_dir / f"tw-w{rooms}-o{nb_objects}-q{quest_length}-s{game_seed}.z8"
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            options = textworld.GameOptions()
            options.seeds = game_seed
            options.nb_rooms = rooms
            options.nb_objects = nb_objects
            options.quest_length = quest_length
            with tempfile.TemporaryDirectory(dir=output_dir) as scratch:
                options.path = os.path.join(scratch, path.name)
                compile_game(make_game(options), options)
                for suffix in (".json", ".z8"):  # the story file last: it marks a complete game
                    os.replace(Path(scratch, path.name).with_suffix(suffix), path.with_suffix(suffix))
        games.append(path)
    return games


def render_state(goal: str, history: Sequence[str], observation: str) -> str:
    """The text an agent sees: the goal, its previous actions (oldest first) and the current observation.

    Collection and evaluation both render states with this function, so a model trained on
    collected states is evaluated on the same format.
    """
    previous = "\n".join(f"{number}. {action}" for number, action in enumerate(history, start=1)) or "(none)"
    return f"Goal: {goal}\n\nPrevious actions:\n{previous}{_OBSERVATION_HEADING}{observation}"


_OBSERVATION_HEADING = "\n\nCurrent observation:\n"
SCREEN_SIZE = (448, 336)
_SCREEN_FONT_SIZE = 14


def render_screen(text: str, size: tuple[int, int] = SCREEN_SIZE) -> Image.Image:
    """The game's screen: ``text`` in light type on a dark background, wrapped to the width (what does not fit is
    cut at the bottom, as on a terminal)."""
    image = Image.new("RGB", size, (20, 20, 20))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=_SCREEN_FONT_SIZE)
    columns = max(1, int(size[0] / (0.5 * _SCREEN_FONT_SIZE)))
    lines = [line for paragraph in text.splitlines() for line in (textwrap.wrap(paragraph, columns) or [""])]
    draw.multiline_text((8, 8), "\n".join(lines), fill=(230, 230, 230), font=font, spacing=3)
    return image


def screen_text(state: str) -> str:
    """The text part of a :func:`render_state` state for an agent with screen observations: the goal and the previous
    actions; the current observation is the image of :func:`screen_image`."""
    head, _ = state.rsplit(_OBSERVATION_HEADING, 1)
    return f"{head}\n\nCurrent observation: the screen above."


def screen_image(state: str) -> Image.Image:
    """The current observation of a :func:`render_state` state as an image of the game's screen
    (:func:`render_screen`)."""
    return render_screen(state.rsplit(_OBSERVATION_HEADING, 1)[1])


def chat_turn(role: str, text: str, *, parts: bool = False, image: bool = False) -> dict:
    """A chat message: plain text, or (``parts``) a list of content parts — an image placeholder first when ``image``
    — as vision-language processors read them (and as TRL's vision datasets hold them)."""
    if not parts:
        return {"role": role, "content": text}
    return {"role": role, "content": [*([{"type": "image"}] if image else []), {"type": "text", "text": text}]}


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the environment shows after ``reset`` or a step.

    ``text`` is the game's answer to the last command (left out after ``reset``: it is a title
    banner), then the room description and the inventory; ``history`` holds the previous actions
    as the agent sees them (invalid ones shortened and marked).
    """

    goal: str
    history: tuple[str, ...]
    text: str
    admissible: tuple[str, ...]
    score: float
    max_score: float
    won: bool
    lost: bool
    steps: int

    @property
    def state(self) -> str:
        """The agent's input, :func:`render_state` of the goal, history and text."""
        return render_state(self.goal, self.history, self.text)


def _normalize(text: str) -> str:
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return " ".join(word for word in words if word not in _ARTICLES)


def match_command(text: str, admissible: Sequence[str]) -> str | None:
    """The admissible command that free text ``text`` asks for, or ``None`` when there is none or several.

    Case, punctuation, whitespace and the articles a/an/the are ignored.  An exact match wins;
    otherwise the commands the text contains as whole words count, a command contained in another
    contained command dropping out ("take key from box" over "take key"); exactly one must remain.
    """
    wanted = _normalize(text)
    if not wanted:
        return None
    normalized = {command: _normalize(command) for command in admissible}
    exact = [command for command, form in normalized.items() if form == wanted]
    if exact:
        return exact[0] if len(exact) == 1 else None
    contained = {command: form for command, form in normalized.items() if form and f" {form} " in f" {wanted} "}
    maximal = [
        command
        for command, form in contained.items()
        if not any(other != form and f" {form} " in f" {other} " for other in contained.values())
    ]
    return maximal[0] if len(maximal) == 1 else None


class GameView(NamedTuple):
    """What a game reports after starting or after a command: ``feedback`` (the answer to the command, empty at the
    start), ``place`` (room description and inventory: they make the state Markovian), the admissible commands, the
    score and whether the game is won or lost."""

    goal: str
    feedback: str
    place: str
    admissible: tuple[str, ...]
    score: float
    max_score: float
    won: bool
    lost: bool


class TextGameEnv:
    """A text game with free-text actions, a step limit and score-increase rewards: the agent interface of every
    game (TextWorld here, TextWorldExpress in :mod:`llmq.envs.textworld_express`).  A subclass starts its game
    (``_start``, which also sets ``walkthrough``) and plays an admissible command (``_act``); this class matches free
    text to a command, keeps the history and ends the episode.

    Args:
        max_steps: steps per episode, invalid ones included; the episode ends after them.
    """

    def __init__(self, max_steps: int) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.max_steps = max_steps
        self.walkthrough: list[str] = []
        self._last: Observation | None = None
        self._place = ""

    def _start(self) -> GameView:
        raise NotImplementedError

    def _act(self, command: str) -> GameView:
        raise NotImplementedError

    def reset(self) -> Observation:
        """Start a new episode and return the first observation."""
        view = self._start()
        self._place = view.place
        self._last = Observation(
            goal=view.goal,
            history=(),
            text=view.place,
            admissible=view.admissible,
            score=view.score,
            max_score=view.max_score,
            won=view.won,
            lost=view.lost,
            steps=0,
        )
        return self._last

    def step(self, command: str) -> tuple[Observation, float, bool, dict]:
        """Play free text ``command``: matched to an admissible command, or a wasted step with feedback.

        Returns:
            ``(observation, reward, done, info)``: ``reward`` is the score increase, ``done`` is
            true on a win, a loss or the step limit, and ``info`` holds ``valid`` (the text matched
            an admissible command), ``command`` (that command, or ``None``) and ``truncated`` (the
            episode ended on the step limit alone).
        """
        last = self._last
        if last is None or last.won or last.lost or last.steps >= self.max_steps:
            raise RuntimeError("the episode is over (or was never started): call reset()")
        matched = match_command(command, last.admissible)
        if matched is None:
            entry = " ".join(command.split())
            shown = entry[:_HISTORY_ENTRY_CHARS] + "…" if len(entry) > _HISTORY_ENTRY_CHARS else entry
            entry = f"{shown} (invalid)".lstrip()
            observation = dataclasses.replace(
                last,
                history=last.history + (entry,),
                text=join_paragraphs(INVALID_FEEDBACK, self._place),
                steps=last.steps + 1,
            )
        else:
            view = self._act(matched)
            self._place = view.place
            observation = dataclasses.replace(
                last,
                history=last.history + (matched,),
                text=join_paragraphs(view.feedback, view.place),
                admissible=view.admissible,
                score=view.score,
                won=view.won,
                lost=view.lost,
                steps=last.steps + 1,
            )
        self._last = observation
        ended = observation.won or observation.lost
        done = ended or observation.steps >= self.max_steps
        return (
            observation,
            float(observation.score - last.score),
            done,
            {"valid": matched is not None, "command": matched, "truncated": done and not ended},
        )

    def close(self) -> None:
        """Stop the game."""

    def __enter__(self) -> TextGameEnv:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TextWorldEnv(TextGameEnv):
    """One TextWorld game (:class:`TextGameEnv`).

    Args:
        game_file: a story file from :func:`make_games` (its ``.json`` beside it).
        max_steps: steps per episode, invalid ones included; the episode ends after them.
        seed: seed of the game interpreter's random number generator.
    """

    def __init__(self, game_file: str | Path, max_steps: int, seed: int = 0) -> None:
        super().__init__(max_steps)
        self.game_file = Path(game_file)
        if not self.game_file.is_file():
            raise FileNotFoundError(f"no TextWorld game at '{self.game_file}'")
        with _interpreter_warnings_off():
            self._env = textworld.start(str(self.game_file), request_infos=_INFOS)
        self._env.seed(seed)

    def _view(self, state, feedback: str) -> GameView:
        return GameView(
            goal=state["objective"].strip(),
            feedback=feedback,
            place=join_paragraphs(state["description"], state["inventory"]),
            admissible=tuple(state["admissible_commands"]),
            score=state["score"],
            max_score=state["max_score"],
            won=state["won"],
            lost=state["lost"],
        )

    def _start(self) -> GameView:
        with _interpreter_warnings_off():
            state = self._env.reset()
        self.walkthrough = list(state["extra.walkthrough"] or [])
        return self._view(state, "")  # the first feedback is a title banner

    def _act(self, command: str) -> GameView:
        with _interpreter_warnings_off():
            state, _, _ = self._env.step(command)
        return self._view(state, state["feedback"])

    def close(self) -> None:
        """Stop the game interpreter."""
        self._env.close()


def join_paragraphs(*parts: str) -> str:
    """Paragraphs of game text, without the interpreter's centring indentation and blank-line runs."""
    text = "\n\n".join(part for part in parts if part and part.strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.strip() for line in text.splitlines())).strip()


def random_policy(seed: int = 0) -> Policy:
    """A policy that picks an admissible command uniformly at random (its own generator, seeded)."""
    rng = np.random.default_rng(seed)

    def policy(states: list[str], admissible: list[list[str]]) -> list[str]:
        return [commands[rng.integers(len(commands))] for commands in admissible]

    return policy


def open_game(game: Game, max_steps: int, seed: int = 0) -> TextGameEnv:
    """The environment of a game: a TextWorld story file, or a game that opens its own (a
    :class:`~llmq.envs.textworld_express.TextWorldExpressGame`)."""
    if isinstance(game, (str, Path)):
        return TextWorldEnv(game, max_steps, seed=seed)
    return game.open(max_steps, seed)


def game_name(game: Game) -> str:
    """A game's name in data rows and reports: a story file's stem, else the game's ``name``."""
    return Path(game).stem if isinstance(game, (str, Path)) else game.name


def walkthrough_policy(games: Sequence[Game]) -> Policy:
    """The oracle: each game's walkthrough, which wins it with the full score.

    The states along every walkthrough are rendered once by playing it; the policy looks states
    up, so it only knows these ``games`` and only the states on their walkthroughs (``KeyError``
    elsewhere).
    """
    plan: dict[str, str] = {}
    for game in games:
        with open_game(game, max_steps=10_000) as env:
            observation = env.reset()
            for command in env.walkthrough:
                if plan.setdefault(observation.state, command) != command:
                    raise ValueError(
                        f"two games' walkthroughs take different commands in the same state "
                        f"({plan[observation.state]!r} and {command!r}): the walkthrough policy cannot tell them apart"
                    )
                observation, _, done, _ = env.step(command)
                if done:
                    break

    def policy(states: list[str], admissible: list[list[str]]) -> list[str]:
        missing = [state for state in states if state not in plan]
        if missing:
            raise KeyError(f"the walkthrough policy met a state off its games' walkthroughs:\n{missing[0]}")
        return [plan[state] for state in states]

    return policy


def policy_prompt(
    state: str, admissible: Sequence[str], system_prompt: str = SYSTEM_PROMPT, *, screens: bool = False
) -> list[dict]:
    """The chat messages :func:`llm_policy` sends for one state: the state and the admissible commands.  With
    ``screens`` the current observation is the image of :func:`screen_image` (the user turn starts with it)."""
    commands = "\n".join(f"- {command}" for command in admissible)
    text = screen_text(state) if screens else state
    return [
        chat_turn("system", system_prompt, parts=screens),
        chat_turn(
            "user", f"{text}\n\nAdmissible commands:\n{commands}\n\nYour command:", parts=screens, image=screens
        ),
    ]


def policy_example(state: str, admissible: Sequence[str], command: str, *, screens: bool = False) -> dict:
    """A supervised example of the policy in TRL's conversational prompt-completion format: :func:`policy_prompt`
    and ``command`` as the assistant's reply; with ``screens`` also the state's screen (``images``)."""
    example = {
        "prompt": policy_prompt(state, admissible, screens=screens),
        "completion": [chat_turn("assistant", command, parts=screens)],
    }
    if screens:
        example["images"] = [screen_image(state)]
    return example


def llm_policy(
    engine: Engine,
    sampling: SamplingParams = SamplingParams(max_new_tokens=24, stop=("\n",)),
    system_prompt: str = SYSTEM_PROMPT,
) -> Policy:
    """A policy that asks a language model for each command, through an llmq engine.

    Each state becomes the chat prompt of :func:`policy_prompt`; the completion's text is the
    action (matched by the environment).  Successive calls get successive seeds from
    ``sampling.seed`` on, so sampled actions differ from call to call while a fresh policy
    replays the same ones.

    Args:
        engine: e.g. ``llmq.rollout.HFEngine(model, tokenizer, progress=False)``.
        sampling: decoding settings; the default is greedy, one line of at most 24 tokens.
        system_prompt: the instruction in the system turn.
    """
    next_seed = sampling.seed

    def policy(states: list[str], admissible: list[list[str]]) -> list[str]:
        nonlocal next_seed
        prompts = [policy_prompt(state, commands, system_prompt) for state, commands in zip(states, admissible)]
        # An engine seeds its batches seed, seed + 1, ...: advancing by the number of prompts (at
        # least the number of batches) keeps the seeds of different calls apart.
        seed, next_seed = next_seed, next_seed + len(prompts)
        completions = engine.generate(prompts, n=1, sampling=dataclasses.replace(sampling, seed=seed))
        return [completion[0].text.strip() for completion in completions]

    return policy


def command_logprobs(
    model, tokenizer, states: list[str], admissible: list[list[str]], batch_size: int = 8, *, screens: bool = False
) -> list[list[float]]:
    """``log π(command ⊕ end-of-turn | chat prompt)`` of every admissible command of every state.

    The prompt is :func:`policy_prompt` through the chat template, read once
    per state (:func:`llmq.models.features.score_continuations`); the end-of-turn token makes a
    command's score that of the whole reply, not of a prefix.  With ``screens`` a vision-language model
    (``tokenizer``: its processor) reads each state's screen with the prompt, also once per state.
    """
    prompts = [
        tokenizer.apply_chat_template(
            policy_prompt(state, commands, screens=screens), tokenize=False, add_generation_prompt=True
        )
        for state, commands in zip(states, admissible)
    ]
    end = getattr(tokenizer, "tokenizer", tokenizer).eos_token or ""
    replies = [[command + end for command in commands] for commands in admissible]
    images = [screen_image(state) for state in states] if screens else None
    _, _, logprobs = score_continuations(
        model, tokenizer, prompts, replies, images=images, batch_size=batch_size, progress=False
    )
    return [scores.tolist() for scores in logprobs]


def likelihood_policy(
    model, tokenizer, *, temperature: float = 0.0, seed: int = 0, batch_size: int = 8, screens: bool = False
) -> Policy:
    """A TextWorld policy that picks an admissible command by the LM's likelihood of it:
    the most likely one (``temperature`` 0) or a sample from ``softmax(log π / temperature)``.  With ``screens`` a
    vision-language model (``tokenizer``: its processor) scores the commands seeing each state's screen."""
    rng = np.random.default_rng(seed)

    def policy(states: list[str], admissible: list[list[str]]) -> list[str]:
        chosen = []
        for commands, scores in zip(
            admissible, command_logprobs(model, tokenizer, states, admissible, batch_size, screens=screens)
        ):
            if temperature == 0:
                chosen.append(commands[int(np.argmax(scores))])
            else:
                weights = np.exp((np.asarray(scores) - max(scores)) / temperature)
                chosen.append(commands[rng.choice(len(commands), p=weights / weights.sum())])
        return chosen

    return policy


@dataclasses.dataclass
class _Episode:
    game: str
    episode: int
    last: Observation
    states: list[str] = dataclasses.field(default_factory=list)
    actions: list[str] = dataclasses.field(default_factory=list)
    valid: list[bool] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    admissible: list[list[str]] = dataclasses.field(default_factory=list)
    truncated: bool = False


def _play(
    policy: Policy, games: Sequence[Game], episodes_per_game: int, max_steps: int, seed: int, batch_size: int
) -> Iterator[_Episode]:
    """Play ``episodes_per_game`` episodes of every game, ``batch_size`` episodes at a time, the
    policy called once per step on all unfinished episodes of a batch."""
    if episodes_per_game < 1 or batch_size < 1:
        raise ValueError(
            f"episodes_per_game and batch_size must be at least 1, got {episodes_per_game} and {batch_size}"
        )
    jobs = [(game, episode) for episode in range(episodes_per_game) for game in games]
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        envs = [open_game(game, max_steps, seed=seed + episode) for game, episode in batch]
        try:
            records = [_Episode(game_name(game), episode, env.reset()) for (game, episode), env in zip(batch, envs)]
            running = list(range(len(batch)))
            while running:
                observations = [records[i].last for i in running]
                actions = policy([o.state for o in observations], [list(o.admissible) for o in observations])
                if len(actions) != len(running):
                    raise ValueError(f"the policy returned {len(actions)} actions for {len(running)} states")
                still_running = []
                for i, observation, action in zip(running, observations, actions):
                    following, reward, done, info = envs[i].step(action)
                    record = records[i]
                    record.states.append(observation.state)
                    record.admissible.append(list(observation.admissible))
                    record.actions.append(info["command"] or action)
                    record.valid.append(info["valid"])
                    record.rewards.append(reward)
                    record.last, record.truncated = following, info["truncated"]
                    if not done:
                        still_running.append(i)
                running = still_running
        finally:
            for env in envs:
                env.close()
        yield from records


def collect_trajectories(
    policy: Policy,
    games: Sequence[Game],
    episodes_per_game: int,
    max_steps: int,
    seed: int = 0,
    *,
    gamma: float = 0.95,
    batch_size: int = 32,
) -> datasets.Dataset:
    """Play ``policy`` on ``games`` and return one row per step, ordered by episode, game and step.

    Columns: ``game`` (:func:`game_name`), ``episode``, ``step`` (from 0), ``state`` (the
    :func:`render_state` text the policy saw), ``action`` (the matched admissible command, or the
    raw text when it matched none), ``valid``, ``reward`` (score increase), ``next_state``, ``done``
    (true on the last step of every episode: win, loss or ``max_steps``), ``truncated`` (the
    episode ended on ``max_steps`` alone), ``won`` (the episode was won; the same on all its rows),
    ``mc_return`` (``Σ_k γ^k r_{t+k}`` to the end of the episode, Digi-Q's Monte-Carlo return,
    docs/algorithms.md §5.2) and ``admissible`` (the state's admissible commands).

    Args:
        policy: ``(states, admissible) -> actions`` on a batch of games.
        games: story files from :func:`make_games`, or other games (:data:`Game`).
        episodes_per_game: episodes of each game.
        max_steps: steps per episode.
        seed: episode ``e`` of every game seeds its game interpreter with ``seed + e``; policies
            draw their own randomness (``random_policy(seed)``, ``SamplingParams.seed``).
        gamma: discount of ``mc_return`` (Digi-Q uses 0.95).
        batch_size: episodes played at once (the policy's batch).
    """
    columns: dict[str, list] = {
        name: []
        for name in (
            "game",
            "episode",
            "step",
            "state",
            "action",
            "valid",
            "reward",
            "next_state",
            "done",
            "truncated",
            "won",
            "mc_return",
            "admissible",
        )
    }
    for record in _play(policy, games, episodes_per_game, max_steps, seed, batch_size):
        length = len(record.actions)
        returns = [0.0] * length
        following = 0.0
        for t in reversed(range(length)):
            following = record.rewards[t] + gamma * following
            returns[t] = following
        next_states = record.states[1:] + [record.last.state]
        for t in range(length):
            for name, value in (
                ("game", record.game),
                ("episode", record.episode),
                ("step", t),
                ("state", record.states[t]),
                ("action", record.actions[t]),
                ("valid", record.valid[t]),
                ("reward", record.rewards[t]),
                ("next_state", next_states[t]),
                ("done", t == length - 1),
                ("truncated", record.truncated and t == length - 1),
                ("won", record.last.won),
                ("mc_return", returns[t]),
                ("admissible", record.admissible[t]),
            ):
                columns[name].append(value)
    features = datasets.Features(
        game=datasets.Value("string"),
        episode=datasets.Value("int32"),
        step=datasets.Value("int32"),
        state=datasets.Value("string"),
        action=datasets.Value("string"),
        valid=datasets.Value("bool"),
        reward=datasets.Value("float64"),
        next_state=datasets.Value("string"),
        done=datasets.Value("bool"),
        truncated=datasets.Value("bool"),
        won=datasets.Value("bool"),
        mc_return=datasets.Value("float64"),
        admissible=datasets.Sequence(datasets.Value("string")),
    )
    return datasets.Dataset.from_dict(columns, features=features)


AGENT_METRICS = {"success_rate": "won", "normalized_score": "normalized_score"}  # reported mean: per-game record key


def agent_scores(per_game: Sequence[dict], seed: int = 0) -> dict:
    """The :data:`AGENT_METRICS` means over ``per_game`` records, each with its 95% interval ``*_ci95``
    (:func:`llmq.stats.mean_interval`: Wilson's for values in [0, 1])."""
    scores = {}
    for metric, key in AGENT_METRICS.items():
        values = [float(game[key]) for game in per_game]
        scores[metric], scores[f"{metric}_ci95"] = float(np.mean(values)), list(mean_interval(values, seed=seed))
    return scores


def evaluate_agent(
    policy: Policy, games: Sequence[Game], max_steps: int, seed: int = 0, *, batch_size: int = 32
) -> dict:
    """Play one episode of every game and report success and normalised score.

    Returns:
        :func:`agent_scores` (``success_rate``, ``normalized_score`` and their 95% intervals), ``steps_mean``,
        ``invalid_action_rate`` (over all
        steps), ``episodes`` and ``games``: per game ``game``, ``won``, ``score``, ``max_score``,
        ``normalized_score``, ``steps`` and ``invalid_actions``.
    """
    per_game = [
        {
            "game": record.game,
            "won": record.last.won,
            "score": record.last.score,
            "max_score": record.last.max_score,
            "normalized_score": record.last.score / record.last.max_score,
            "steps": len(record.actions),
            "invalid_actions": record.valid.count(False),
        }
        for record in _play(policy, games, 1, max_steps, seed, batch_size)
    ]
    if not per_game:
        raise ValueError("evaluate_agent needs at least one game")
    steps = sum(game["steps"] for game in per_game)
    return {
        "episodes": len(per_game),
        **agent_scores(per_game, seed=seed),
        "steps_mean": steps / len(per_game),
        "invalid_action_rate": sum(game["invalid_actions"] for game in per_game) / steps,
        "games": per_game,
    }
