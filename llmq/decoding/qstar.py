"""Q* deliberative decoding: A* over reasoning steps guided by a Q-value model (docs/algorithms.md §4).

A state is the question plus the steps so far; an action is the next step.  Q(s, a) is the value of the
answer's outcome (the reward arrives with the final step): the best outcome reachable through step a.
A process utility R_P (a PRM's step score, a rule-based penalty, or none) is a second, separate signal.
The search returns the answer that maximises

    J(τ) = Agg(R_P(s_1), …, R_P(s_T)) + λ·R(τ)                                   (§4.3)

by always expanding the frontier state with the largest f = g + λ·h, where h is the best outcome
reachable from the state and g bounds from above the aggregated utility of every answer below it:

* ``min``: utilities already seen can only be lowered by later steps, so g = min so far;
* ``sum``: later steps add their utilities, so the bound g = sum so far holds only for utilities ≤ 0
  (penalties; ``utility_max`` ≤ 0 is required and checked);
* ``last``: only the final step's utility counts, so a non-final state's g is ``utility_max``;
* ``zero``: g ≡ 0.

At a final state g is the exact aggregate and h its outcome, so f = J; elsewhere f ≥ J of every answer
below.  The first final state popped therefore maximises J when Q is exact.  Two heuristics (§4.3, §4.7):

* ``inherited`` — h of s ⊕ a is the Q-value of the step that produced it, ``Q(s, a)``: no extra proposals;
* ``child`` — h of a non-final child is ``max_c Q(s', c)`` over its own K proposals, which are kept as its
  candidates when it is expanded; a final child keeps ``Q(s, a)``, its outcome.

Everything problem-specific is a callable, so the same search runs on an oracle MDP in the tests
and on an LLM with a value head on GSM8K.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import re
from collections.abc import Callable, Hashable
from tokenize import TokenError
from typing import Literal

import sympy
from sympy.parsing.sympy_parser import parse_expr, rationalize, standard_transformations

from llmq.models.prm import ProcessRewardModel
from llmq.models.qvm import FeatureQVM, ReasoningStep
from llmq.rollout import SamplingParams

Step = Hashable
State = tuple  # the steps so far; the question is implicit in the callables

AGGREGATIONS: dict[str, Callable[[list[float]], float]] = {
    "zero": lambda scores: 0.0,
    "sum": lambda scores: float(sum(scores)),
    "min": lambda scores: float(min(scores)) if scores else 0.0,
    "last": lambda scores: float(scores[-1]) if scores else 0.0,
}

# The largest R_P each ``search_utility`` gives: the bound of an unfinished answer's utility under ``last``.
UTILITY_MAX = {"qvm": 1.0, "prm": 1.0, "rules": 0.0}

_ARITHMETIC = r"[\d\s+\-*/×÷().,$]"
_EQUATION = re.compile(rf"{_ARITHMETIC}+(?:={_ARITHMETIC}+)+")


def _exact_value(side: str) -> tuple[sympy.Rational, int] | None:
    """The exact value of one side of an equation and the decimals it is written with; None if it is not
    plain arithmetic (the text is reduced to digits, operators and parentheses before sympy parses it)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", side.replace("$", "").replace("×", "*").replace("÷", "/"))
    text = text.strip().strip(".,").strip()
    if not re.fullmatch(r"[\d\s+\-*/().]*\d[\d\s+\-*/().]*", text) or "**" in text:
        return None
    if re.match(r"[+*/]|-\s", text):  # cut off by a word ("5 apples - 2 = 3"): not the whole expression
        return None
    try:
        value = parse_expr(text, transformations=(*standard_transformations, rationalize))
    except (SyntaxError, TypeError, ValueError, ZeroDivisionError, TokenError):
        return None
    if not isinstance(value, sympy.Rational):
        return None  # e.g. a division by zero
    decimals = re.fullmatch(r"-?\d+\.(\d+)", text)
    return value, len(decimals.group(1)) if decimals else 0


def arithmetic_penalty(text: str) -> float:
    """Rule-based R_P of a step: -1 if an equation in it is false, else 0.  Each side of ``a = b = c`` is
    evaluated exactly; a right side written with d > 0 decimals may be rounded (|left − right| ≤ ½·10⁻ᵈ).  Text that is
    not plain arithmetic is not judged."""
    for chain in _EQUATION.findall(text):
        sides = [_exact_value(side) for side in chain.split("=")]
        for left, right in zip(sides, sides[1:]):
            if left is None or right is None:
                continue
            tolerance = sympy.Rational(1, 2 * 10 ** right[1]) if right[1] else 0
            if abs(left[0] - right[0]) > tolerance:
                return -1.0
    return 0.0


def process_utility(
    kind: Literal["none", "qvm", "prm", "rules"],
    *,
    scored: dict[tuple[State, ReasoningStep], float],
    prm: ProcessRewardModel | None,
    question: str,
    delimiter: str,
) -> Callable[[State], float] | None:
    """R_P of a state's last step for ``search_utility`` ``kind``: the QVM's value of it (looked up in ``scored``,
    the Q-values the search has computed, clipped to [0, 1]), ``prm``'s score of it after ``question`` and the
    steps before it, or the rules' penalty of its text; None for ``none``."""
    if kind == "none":
        return None
    if kind == "qvm":
        return lambda state: min(max(scored[(state[:-1], state[-1])], 0.0), 1.0)
    if kind == "prm":
        return lambda state: prm.last_step_score(question, [step.text.removesuffix(delimiter) for step in state])
    return lambda state: arithmetic_penalty(state[-1].text)


@dataclasses.dataclass
class Node:
    """One state of the search tree."""

    id: int
    parent: int | None
    state: State
    depth: int
    g: float
    h: float
    f: float
    terminal: bool
    expanded: bool = False


@dataclasses.dataclass
class SearchResult:
    """The answer (``best``: the first terminal popped, else the best terminal by f, else the
    best frontier state), every node created, and how many expansions the search used."""

    best: Node
    nodes: list[Node]
    expansions: int
    budget_exhausted: bool

    def path(self, node: Node | None = None) -> list[Node]:
        """Root → ``node`` (default: the answer)."""
        node = self.best if node is None else node
        chain = [node]
        while chain[-1].parent is not None:
            chain.append(self.nodes[chain[-1].parent])
        return chain[::-1]


def astar_search(
    *,
    propose: Callable[[list[State], int], list[list[Step]]],
    q_values: Callable[[list[tuple[State, Step]]], list[float]],
    is_terminal: Callable[[State], bool],
    num_candidates: int,
    budget: int,
    max_depth: int,
    lam: float = 1.0,
    aggregate: Literal["zero", "sum", "min", "last"] = "zero",
    utility: Callable[[State], float] | None = None,
    utility_max: float | None = None,
    heuristic: Literal["inherited", "child"] = "inherited",
    dedup: bool = True,
    root: State = (),
) -> SearchResult:
    """A* over steps; returns the explored tree and the answer.

    Args:
        propose: ``(states, K) -> K candidate next steps per state`` (batched over states; a
            proposer may return fewer, e.g. after removing duplicates).
        q_values: ``[(state, step), ...] -> Q(state, step)``, the best outcome reachable through the step
            (the QVM, batched).
        is_terminal: whether a state is finished (final answer given, or a length limit).
        num_candidates: K, candidates per expansion.
        budget: the most expansions (a state's K proposals and their scores count as one).
        max_depth: states this many steps deep are not expanded further.
        lam: λ, the weight of the outcome in J (and of h in f).
        aggregate: how g combines the process utilities of the prefixes (``zero``: g ≡ 0).
        utility: R_P of a state (its last step's process score), never the outcome that Q estimates;
            needed unless ``aggregate`` is zero.
        utility_max: the largest value ``utility`` returns (checked); needed by ``sum`` (≤ 0) and ``last``.
        heuristic: ``inherited`` or ``child`` (see the module docstring).
        dedup: do not add a state that is already in the tree (identical step sequences).
        root: the initial state.
    """
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {sorted(AGGREGATIONS)}, got {aggregate!r}")
    if aggregate != "zero" and utility is None:
        raise ValueError(f"aggregate {aggregate!r} needs a utility function")
    if aggregate == "zero" and utility is not None:
        raise ValueError("a utility needs an aggregate (min, last or sum): with 'zero' it would be ignored")
    if aggregate == "sum" and (utility_max is None or utility_max > 0):
        raise ValueError(
            "aggregate 'sum' needs utilities <= 0 (utility_max <= 0, penalties): positive utilities of steps still "
            f"to come are not in f, so the search could stop at a worse answer (got utility_max {utility_max}); "
            "use 'min' or 'last'"
        )
    if aggregate == "last" and utility_max is None:
        raise ValueError("aggregate 'last' needs utility_max: the bound of an unfinished answer's last utility")
    if heuristic not in ("inherited", "child"):
        raise ValueError(f"heuristic must be 'inherited' or 'child', got {heuristic!r}")
    if budget < 1 or num_candidates < 1 or max_depth < 1:
        raise ValueError("budget, num_candidates and max_depth must be at least 1")
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (λ weighs the heuristic; λ ≤ 0 ignores or inverts it), got {lam}")

    combine = AGGREGATIONS[aggregate]

    def checked_utility(state: State) -> list[float]:
        value = utility(state)
        if utility_max is not None and value > utility_max:
            raise ValueError(f"utility returned {value}, above utility_max {utility_max}")
        return [value]

    def g_bound(scores: list[float], terminal: bool) -> float:
        """g of a state: the exact aggregate when it is final, else an upper bound over the answers below it."""
        if aggregate == "last" and not terminal:
            return utility_max
        return combine(scores)

    utilities: dict[State, list[float]] = {root: []}
    nodes = [Node(id=0, parent=None, state=root, depth=0, g=0.0, h=0.0, f=0.0, terminal=is_terminal(root))]
    seen = {root}
    # The child heuristic proposes and scores a child's next steps to compute its h: kept here, they are the
    # child's candidates when it is expanded (each state is proposed once, so every sampled token counts once).
    proposed: dict[State, tuple[list[Step], list[float]]] = {}
    tie = itertools.count()  # equal f: the earlier node first (FIFO), so the search is deterministic
    frontier = [(-0.0, next(tie), 0)]
    expansions, answer = 0, None
    while frontier:
        node = nodes[heapq.heappop(frontier)[2]]
        if node.terminal:
            answer = node
            break
        if node.depth >= max_depth:
            continue
        if expansions == budget:
            heapq.heappush(frontier, (-node.f, next(tie), node.id))
            break
        expansions += 1
        node.expanded = True
        if node.state in proposed:
            steps, step_scores = proposed.pop(node.state)
        else:
            steps, step_scores = propose([node.state], num_candidates)[0], None
        fresh = []
        for index, step in enumerate(steps):
            child = node.state + (step,)
            if not (dedup and child in seen):
                seen.add(child)
                fresh.append((index, step, child))
        if not fresh:
            continue
        if step_scores is None:
            scores = q_values([(node.state, step) for _, step, _ in fresh])
        else:
            scores = [step_scores[index] for index, _, _ in fresh]
        terminal = [is_terminal(child) for _, _, child in fresh]
        if heuristic == "child":
            open_children = [child for (_, _, child), done in zip(fresh, terminal) if not done]
            proposals = propose(open_children, num_candidates) if open_children else []
            pairs = [
                (child, step) for child, steps_of_child in zip(open_children, proposals) for step in steps_of_child
            ]
            values = iter(q_values(pairs)) if pairs else iter(())
            for child, steps_of_child in zip(open_children, proposals):
                proposed[child] = (steps_of_child, [next(values) for _ in steps_of_child])
        for (_, _, child), score, done in zip(fresh, scores, terminal):
            utilities[child] = utilities[node.state] + (checked_utility(child) if utility is not None else [])
            g = g_bound(utilities[child], done)
            if heuristic == "child" and not done:
                h = max(proposed[child][1], default=score)
            else:
                h = score  # Q(s, a); for a final step, its outcome
            nodes.append(
                Node(
                    id=len(nodes),
                    parent=node.id,
                    state=child,
                    depth=node.depth + 1,
                    g=g,
                    h=h,
                    f=g + lam * h,
                    terminal=done,
                )
            )
            heapq.heappush(frontier, (-nodes[-1].f, next(tie), nodes[-1].id))

    exhausted = answer is None
    if answer is None:
        terminals = [n for n in nodes if n.terminal]
        answer = max(terminals or [n for n in nodes if not n.expanded] or nodes, key=lambda n: (n.f, -n.id))
    return SearchResult(best=answer, nodes=nodes, expansions=expansions, budget_exhausted=exhausted)


class LLMStepProposer:
    """K candidate next steps per state from an llmq engine: each sample stops at the step delimiter.

    Args:
        engine: e.g. :class:`llmq.rollout.HFEngine`; raw prompts are the question's rendered chat
            prompt followed by the steps so far.
        prompt: the rendered prompt of the question (``tokenizer.apply_chat_template(..., tokenize=False,
        add_generation_prompt=True)``).
        eos_token_ids: token ids that end an answer.
        delimiter: text that ends a step (GSM8K solutions: one line per step).
        max_step_tokens: budget of one step; a longer step is cut there.
        temperature: sampling temperature of the candidates.
        seed: seed of the first call; later calls use the following seeds.
    """

    def __init__(
        self,
        engine,
        prompt: str,
        eos_token_ids: set[int],
        *,
        delimiter: str = "\n",
        max_step_tokens: int = 96,
        temperature: float = 0.8,
        seed: int = 0,
    ) -> None:
        self.engine, self.prompt, self.eos_token_ids, self.delimiter = engine, prompt, eos_token_ids, delimiter
        self.sampling = SamplingParams(
            max_new_tokens=max_step_tokens, temperature=temperature, stop=(delimiter,), seed=seed
        )
        self.generated_tokens = 0

    def __call__(self, states: list[State], k: int) -> list[list[ReasoningStep]]:
        prompts = [self.prompt + "".join(step.text for step in state) for state in states]
        outputs = self.engine.generate(prompts, n=k, sampling=self.sampling)
        self.sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + len(prompts))
        proposals = []
        for group in outputs:
            steps = []
            for completion in group:
                self.generated_tokens += len(completion.token_ids)
                final = bool(completion.token_ids) and completion.token_ids[-1] in self.eos_token_ids
                cut = completion.finish_reason == "stop" and not final  # stopped at the delimiter
                steps.append(ReasoningStep(completion.text + (self.delimiter if cut else ""), final))
            proposals.append(steps)
        return proposals


def qstar_answer(
    model,
    tokenizer,
    engine,
    prompt: str,
    heads,
    *,
    layer: int | None,
    delimiter: str,
    budget: int,
    num_candidates: int,
    lam: float,
    heuristic: Literal["inherited", "child"],
    max_depth: int,
    step_max_tokens: int,
    temperature: float,
    seed: int,
    utility: Literal["none", "qvm", "prm", "rules"] = "none",
    aggregate: Literal["min", "last", "sum"] = "min",
    prm: ProcessRewardModel | None = None,
    question: str = "",
    finish_within: int | None = None,
) -> tuple[str, int, SearchResult]:
    """Answer one question by Q* search: steps proposed by ``engine`` (the policy), scored by the
    QVM ``heads`` on ``model``'s features; g aggregates the process utility ``utility`` of each step
    (``prm`` scores steps after ``question``).  With ``finish_within``, an answer the search left
    unfinished (its last step does not end the answer) is completed by one sample of the policy, up to
    that many answer tokens in all.  Returns the answer text, the tokens generated (every proposal,
    explored or not, and the completion) and the search tree."""
    proposer = LLMStepProposer(
        engine,
        prompt,
        {tokenizer.eos_token_id},
        delimiter=delimiter,
        max_step_tokens=step_max_tokens,
        temperature=temperature,
        seed=seed,
    )
    qvm = FeatureQVM(model, tokenizer, heads, prompt, layer=layer)
    scored: dict[tuple[State, ReasoningStep], float] = {}

    def q_values(pairs: list[tuple[State, ReasoningStep]]) -> list[float]:
        values = qvm(pairs)
        scored.update(zip(pairs, values))
        return values

    process = process_utility(utility, scored=scored, prm=prm, question=question, delimiter=delimiter)
    result = astar_search(
        propose=proposer,
        q_values=q_values,
        is_terminal=lambda state: bool(state) and (state[-1].final or len(state) >= max_depth),
        num_candidates=num_candidates,
        budget=budget,
        max_depth=max_depth,
        lam=lam,
        aggregate="zero" if utility == "none" else aggregate,
        utility=process,
        utility_max=UTILITY_MAX.get(utility),
        heuristic=heuristic,
    )
    answer = "".join(step.text for step in result.best.state)
    finished = bool(result.best.state) and result.best.state[-1].final
    if finish_within is None or finished:
        return answer, proposer.generated_tokens, result
    # The budget ran out or max_depth was reached mid-answer: the policy writes the rest, as a rollout would.
    left = finish_within - len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if left < 1:
        return answer, proposer.generated_tokens, result
    rest = SamplingParams(max_new_tokens=left, temperature=temperature, seed=proposer.sampling.seed)
    completion = engine.generate([prompt + answer], n=1, sampling=rest)[0][0]
    return answer + completion.text, proposer.generated_tokens + len(completion.token_ids), result
