"""TextWorldExpress games behind llmq's text-game interface (Jansen and Côté, arXiv 2208.01174).

TextWorldExpress re-implements three established text-game benchmarks in Scala — CookingWorld (the
"First TextWorld Problems" cooking games), TextWorld Commonsense (TWC: put objects where they belong) and
Coin Collector — with its own train, dev and test folds of game seeds, and plays them in a Java process
(``java`` must be on ``PATH``; the ``textworld-express`` package, in the agents extra, ships the jar).

* :func:`fold_games` lists the first games of a fold: the benchmark's own seeds of that fold.
* :class:`TextWorldExpressEnv` plays one of them through :class:`~llmq.envs.textworld.TextGameEnv`: free text
  matched to the valid actions, the same state rendering, history and step limit as TextWorld games.  The
  score is TextWorldExpress's normalised score (1 for a finished task), so ``normalized_score`` of
  :func:`~llmq.envs.textworld.evaluate_agent` is the benchmark's own.

Every function of :mod:`llmq.envs.textworld` that takes games (``collect_trajectories``, ``evaluate_agent``,
``walkthrough_policy``) takes these games too.

Example::

    train = fold_games("coin", "train", count=40, params="numLocations=1,numDistractorItems=0,includeDoors=0")
    report = evaluate_agent(random_policy(seed=0), fold_games("coin", "test", count=20), max_steps=10)
"""

from __future__ import annotations

import dataclasses
import shutil

try:
    from textworld_express import TextWorldExpressEnv as _JavaServer
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("llmq.envs.textworld_express needs TextWorldExpress: pip install 'llmq[agents]'") from error

from llmq.envs.textworld import GameView, TextGameEnv, join_paragraphs

GAMES = ("cookingworld", "twc", "coin")
"""The three benchmarks TextWorldExpress re-implements (its other games are new tasks)."""

FOLDS = ("train", "dev", "test")

JAVA_MISSING = (
    "TextWorldExpress needs a Java runtime (11 or newer) on PATH; none was found: install one, e.g. "
    "'apt-get install openjdk-17-jre-headless' or 'conda install -c conda-forge openjdk'"
)


def _server() -> _JavaServer:
    if shutil.which("java") is None:
        raise RuntimeError(JAVA_MISSING)
    return _JavaServer(envStepLimit=1_000_000)  # TextGameEnv counts the steps


def _close(server: _JavaServer) -> None:
    """Stop the Java process and wait for it to exit (the package's own finaliser writes to it again)."""
    server.close()
    server._gateway.java_process.wait(timeout=30)


def _check_game_and_fold(game: str, fold: str) -> None:
    if game not in GAMES:
        raise ValueError(f"TextWorldExpress game {game!r} is not one of {', '.join(GAMES)}")
    if fold not in FOLDS:
        raise ValueError(f"TextWorldExpress fold {fold!r} is not one of {', '.join(FOLDS)}")


@dataclasses.dataclass(frozen=True)
class TextWorldExpressGame:
    """One TextWorldExpress game: the benchmark (``game``), its generation parameters (``params``, e.g.
    ``"numLocations=1,includeDoors=0"``; empty: the benchmark's defaults), its fold and its seed in that fold."""

    game: str
    fold: str
    seed: int
    params: str = ""

    def __post_init__(self) -> None:
        _check_game_and_fold(self.game, self.fold)

    @property
    def name(self) -> str:
        return f"twx-{self.game}-{self.fold}-s{self.seed}"

    def open(self, max_steps: int, seed: int = 0) -> TextWorldExpressEnv:
        """Its environment (``seed`` is unused: a TextWorldExpress game is deterministic given its own seed)."""
        return TextWorldExpressEnv(self, max_steps)


def fold_games(game: str, fold: str, count: int, params: str = "", offset: int = 0) -> list[TextWorldExpressGame]:
    """Games ``offset … offset + count − 1`` of a fold, in the order of the benchmark's seeds for that fold."""
    _check_game_and_fold(game, fold)  # before a Java process starts
    server = _server()
    try:
        seeds = {"train": server.getValidSeedsTrain, "dev": server.getValidSeedsDev, "test": server.getValidSeedsTest}
        available = list(seeds[fold]())
    finally:
        _close(server)
    if offset < 0 or count < 0 or offset + count > len(available):
        raise ValueError(f"the {fold} fold has {len(available)} games; asked for {count} from game {offset}")
    return [TextWorldExpressGame(game, fold, seed, params) for seed in available[offset : offset + count]]


class TextWorldExpressEnv(TextGameEnv):
    """One TextWorldExpress game in its own Java process (:class:`~llmq.envs.textworld.TextGameEnv`).

    The state shows the task, the previous actions, then the game's answer to the last command, the room
    ("look around") and the inventory, as for TextWorld games.  ``walkthrough`` is the benchmark's gold path.
    """

    def __init__(self, game: TextWorldExpressGame, max_steps: int) -> None:
        super().__init__(max_steps)
        self.game = game
        self._server = _server()
        try:
            self._server.load(game.game, game.params)
        except ValueError as error:  # the Scala side's complaint
            self.close()
            raise ValueError(
                f"TextWorldExpress rejected game {game.game!r} with params {game.params!r}: {error}"
            ) from None

    def _view(self, infos: dict, feedback: str) -> GameView:
        return GameView(
            goal=infos["taskDescription"].strip(),
            feedback=feedback,
            place=join_paragraphs(infos["look"], infos["inventory"]),
            admissible=tuple(infos["validActions"]),
            score=float(infos["score"]),
            max_score=1.0,
            won=bool(infos["tasksuccess"]),
            lost=bool(infos["taskfailure"]),
        )

    def _start(self) -> GameView:
        _, infos = self._server.reset(seed=self.game.seed, gameFold=self.game.fold, generateGoldPath=True)
        self.walkthrough = list(self._server.getGoldActionSequence())
        return self._view(infos, "")

    def _act(self, command: str) -> GameView:
        observation, _, _, infos = self._server.step(command)
        # "look around" answers with the room description, which the state shows anyway
        return self._view(infos, "" if observation.strip() == infos["look"].strip() else observation)

    def close(self) -> None:
        """Stop the Java process."""
        _close(self._server)
