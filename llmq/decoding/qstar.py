"""Q* deliberative decoding: A* over reasoning steps guided by a Q-value model (docs/algorithms.md §4).

A state is the question plus the steps so far; an action is the next step.  The search keeps a
frontier ordered by

    f(s) = g(s) + λ·h(s)          g = Agg(R_P(s_1), …, R_P(s_t)),  h ≈ max_a Q(s, a)      (§4.3)

and always expands the frontier state with the largest f: K candidate next steps are proposed
(by an LLM, batched), scored by the Q-value model, and pushed.  The first terminal state popped is
the answer.  Two heuristics (§4.3, §4.7):

* ``inherited`` — a child's h is the Q-value of the step that produced it, ``Q(s, a)``: no extra
  proposals; with outcome-only rewards, ``g ≡ 0`` and the exact ``Q_hard`` this is exact;
* ``child`` — a non-terminal child's h is ``max_c Q(s', c)`` over its own K proposals (0 for a
  terminal child): with g the rewards collected so far it estimates the total return.

Everything problem-specific is a callable, so the same search runs on an oracle MDP in the tests
and on an LLM with a value head on GSM8K.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable, Hashable
from typing import Literal

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
    heuristic: Literal["inherited", "child"] = "inherited",
    dedup: bool = True,
    root: State = (),
) -> SearchResult:
    """A* over steps; returns the explored tree and the answer.

    Args:
        propose: ``(states, K) -> K candidate next steps per state`` (batched over states; a
            proposer may return fewer, e.g. after removing duplicates).
        q_values: ``[(state, step), ...] -> Q(state, step)`` (the QVM, batched).
        is_terminal: whether a state is finished (final answer given, or a length limit).
        num_candidates: K, candidates per expansion.
        budget: the most expansions (a state's K proposals and their scores count as one).
        max_depth: states this many steps deep are not expanded further.
        lam: λ, the weight of h in f.
        aggregate: how g combines the process utilities of the prefixes (``zero``: g ≡ 0).
        utility: R_P of a state (its last step's process score); needed unless ``aggregate`` is zero.
        heuristic: ``inherited`` or ``child`` (see the module docstring).
        dedup: do not add a state that is already in the tree (identical step sequences).
        root: the initial state.
    """
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {sorted(AGGREGATIONS)}, got {aggregate!r}")
    if aggregate != "zero" and utility is None:
        raise ValueError(f"aggregate {aggregate!r} needs a utility function")
    if heuristic not in ("inherited", "child"):
        raise ValueError(f"heuristic must be 'inherited' or 'child', got {heuristic!r}")
    if budget < 1 or num_candidates < 1 or max_depth < 1:
        raise ValueError("budget, num_candidates and max_depth must be at least 1")
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (λ weighs the heuristic; λ ≤ 0 ignores or inverts it), got {lam}")

    combine = AGGREGATIONS[aggregate]
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
            utilities[child] = utilities[node.state] + ([utility(child)] if utility is not None else [])
            g = combine(utilities[child])
            if heuristic == "inherited":
                h = score
            else:
                h = 0.0 if done else max(proposed[child][1], default=0.0)
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
) -> tuple[str, int, SearchResult]:
    """Answer one question by Q* search: steps proposed by ``engine`` (the policy), scored by the
    QVM ``heads`` on ``model``'s features, ``g ≡ 0``.  Returns the answer text, the tokens generated
    while searching (every proposal, explored or not) and the search tree."""
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
    result = astar_search(
        propose=proposer,
        q_values=qvm,
        is_terminal=lambda state: bool(state) and (state[-1].final or len(state) >= max_depth),
        num_candidates=num_candidates,
        budget=budget,
        max_depth=max_depth,
        lam=lam,
        heuristic=heuristic,
    )
    return "".join(step.text for step in result.best.state), proposer.generated_tokens, result
