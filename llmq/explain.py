"""``llmq explain``: a credit map of one response — the per-token implicit reward β·log π_θ/π_ref.

For a DPO-trained policy this is the token-level reward that DPO learned (docs/algorithms.md §3.5:
tokens that introduce an error get strongly negative values); for a ShiQ policy it is the soft
advantage Q − V.  Both are the same quantity of the pair (policy, reference).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llmq.data.trajectories import TrajectoryCollator, tokenize_trajectory
from llmq.errors import UserError
from llmq.models import EMBEDDED_MODEL, check_model_reference, load_model
from llmq.qfunctions import ImplicitQ
from llmq.rollout import HFEngine, SamplingParams
from llmq.visualize import render_credit_html, render_credit_png, token_strings


@dataclasses.dataclass
class ExplainConfig:
    """What to explain; the policy is ``model_name_or_path``, every field is a recipe key or ``--flag``."""

    prompt: str | None = dataclasses.field(
        default=None, metadata={"help": "The prompt (a user message when chat is on). Required."}
    )
    response: str | None = dataclasses.field(
        default=None, metadata={"help": "The response to explain; default: the policy's own greedy answer."}
    )
    ref_model_name_or_path: str = dataclasses.field(
        default=EMBEDDED_MODEL, metadata={"help": "The reference model the policy was trained against."}
    )
    beta: float = dataclasses.field(
        default=0.1, metadata={"help": "The beta the policy was trained with (scales the rewards)."}
    )
    chat: bool = dataclasses.field(
        default=True, metadata={"help": "Render prompt and response with the tokenizer's chat template."}
    )
    max_new_tokens: int = dataclasses.field(
        default=256, metadata={"help": "Length of the generated response when none is given."}
    )
    output_dir: str = dataclasses.field(
        default="outputs/explain",
        metadata={"help": "Where credit_map.html, credit_map.png and credit_map.json are written."},
    )

    def __post_init__(self) -> None:
        if not self.prompt:
            raise UserError("key 'prompt' is required: the prompt whose response is explained")
        if self.beta <= 0:
            raise UserError(f"key 'beta' must be > 0, got {self.beta}")
        try:
            check_model_reference(self.ref_model_name_or_path)
        except UserError as error:
            raise UserError(f"key 'ref_model_name_or_path': {error}") from None


def explain(model, tokenizer, config: ExplainConfig, model_name: str, dtype: str | None = "auto") -> dict:
    """Compute and render the credit map; returns the JSON record (tokens, values, summary)."""
    response = config.response
    if response is None:
        prompt = [{"role": "user", "content": config.prompt}] if config.chat else config.prompt
        [[completion]] = HFEngine(model, tokenizer, progress=False).generate(
            [prompt], sampling=SamplingParams(max_new_tokens=config.max_new_tokens)
        )
        response = completion.text
    if config.chat:
        row = {
            "prompt": [{"role": "user", "content": config.prompt}],
            "completion": [{"role": "assistant", "content": response}],
            "reward": 0.0,
        }
    else:
        row = {"prompt": config.prompt, "completion": response, "reward": 0.0}
    tokenized = tokenize_trajectory(row, tokenizer, max_length=10**9, index=0)
    batch = TrajectoryCollator(tokenizer.pad_token_id)([tokenized])
    reference = load_model(config.ref_model_name_or_path, dtype=dtype).to(model.device).eval()
    rewards = ImplicitQ(model, reference, config.beta).advantages(
        batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    )
    actions = batch["act_mask"][0].nonzero().flatten().tolist()
    ids = [tokenized["input_ids"][p] for p in actions]
    tokens, values = token_strings(tokenizer, ids), rewards[0, actions].float().cpu().tolist()

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    title = f"{model_name} vs {config.ref_model_name_or_path} (β={config.beta})"
    value_name = "implicit reward β·log π/π_ref"
    (output_dir / "credit_map.html").write_text(
        render_credit_html(tokens, values, title=title, prompt=config.prompt, value_name=value_name)
    )
    render_credit_png(tokens, values, output_dir / "credit_map.png", title=title, value_name=value_name)
    record = {
        "model": model_name,
        "reference": config.ref_model_name_or_path,
        "beta": config.beta,
        "prompt": config.prompt,
        "response": response,
        "tokens": tokens,
        "values": values,
        "sum": sum(values),
    }
    (output_dir / "credit_map.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def format_summary(record: dict, top: int = 3) -> str:
    ranked = sorted(zip(record["values"], record["tokens"]))
    describe = lambda items: ", ".join(f"{token!r} {value:+.3f}" for value, token in items)  # noqa: E731
    return (
        f"{len(record['tokens'])} response tokens, total implicit reward {record['sum']:+.3f}\n"
        f"  most negative: {describe(ranked[:top])}\n  most positive: {describe(reversed(ranked[-top:]))}"
    )
