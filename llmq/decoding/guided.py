"""Token-level Q-guided decoding as a transformers ``LogitsProcessor`` (docs/algorithms.md (B3), §6.1, §6.5, §6.6).

The model that ``generate`` runs is the base π_ref; a guide LM π_θ trained against that base
(by ShiQ, DPO, ...) supplies the advantage of every candidate token,

    A(s, a) = Q(s, a) − V(s) = β·(log π_θ(a|s) − log π_ref(a|s))          (B3, every Q view)

and the guided policy reweights the base by it at a decoding temperature β_dec:

    π_dec(a|s) ∝ π_ref(a|s)·exp(A(s, a)/β_dec)   on the top-k base tokens, 0 elsewhere.

β_dec = β samples π_θ itself (its fixed point: π*); a smaller β_dec follows Q harder and moves
further from the base; top-k keeps the guide from promoting tokens the base finds implausible.

A *Q model* guide (trained with ShiQ's ``q_model``, §6.6) holds ``Q/β`` in its own logits beside the base, so its
policy is ``π_θ = softmax(ℓ_ref + Q/β)`` and one forward of the guide gives the advantage: a small Q model guides
a large base for the cost of the small model.  A policy guide is a whole second policy, as large as whatever it was
trained from, and only costs little when that was small.

Beam search over the processed scores ranks a sequence by ``Σ_t log π_ref + A/β_dec =
(Σ_t r_θ + β_dec·log π_ref(y|x))/β_dec``: the regularised return of the guide's implicit reward,
which for β_dec = β is the guide's own log-likelihood — the implicit-reward beam search of §3.6.
"""

from __future__ import annotations

import inspect

import torch
from transformers import LogitsProcessor

from llmq.decoding.options import DecodingOptions
from llmq.errors import UserError
from llmq.models import load_model, load_tokenizer
from llmq.models.q_model import is_q_model


class QGuidedLogitsProcessor(LogitsProcessor):
    """Reweight the generating (base) model's next-token scores by a guide policy's advantages.

    The guide runs beside ``generate`` with its own KV cache.  It follows the rows it is given:
    rows sampled in parallel, expanded by ``num_return_sequences``, or reordered by beam search
    (each row's parent is found by its prefix).  A call whose rows do not extend the previous
    call's restarts from the prompt, so one processor can serve many ``generate`` calls.
    Models without a KV cache (e.g. :class:`llmq.testing.TabularLM`) are re-run on the whole prefix.

    Args:
        guide_model: π_θ, a causal LM with the base model's vocabulary, on the base model's device.
        beta: the KL temperature β the guide was trained with (it turns log-ratios into rewards).
        guidance_temperature: the decoding temperature β_dec; default ``beta`` (sample the guide itself).
        top_k: candidates per step, the base model's top-k tokens; 0 keeps every token.
        pad_token_id: the padding id of left-padded prompts; a prompt's leading run of it is
            masked out of the guide's attention, as ``generate`` masks it out of the base model's.
        q_model: the guide's logits are ``Q/β`` beside the base (a Q model, any size), not a policy's.
    """

    def __init__(
        self,
        guide_model: torch.nn.Module,
        *,
        beta: float,
        guidance_temperature: float | None = None,
        top_k: int = 20,
        pad_token_id: int | None = None,
        q_model: bool = False,
    ) -> None:
        guidance_temperature = beta if guidance_temperature is None else guidance_temperature
        if beta <= 0 or guidance_temperature <= 0:
            raise ValueError(f"beta and guidance_temperature must be > 0, got {beta} and {guidance_temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.guide_model = guide_model
        self.weight = beta / guidance_temperature  # A/β_dec = (β/β_dec)·(log π_θ − log π_ref)
        self.top_k = top_k
        self.pad_token_id = pad_token_id
        self.q_model = q_model
        # transformers renamed `past_key_values` to `cache` within 5.x; both name one Cache object.
        self._cache_key = (
            "cache" if "cache" in inspect.signature(guide_model.forward).parameters else "past_key_values"
        )
        self._fed: torch.Tensor | None = None  # the token rows the guide has read
        self._mask: torch.Tensor | None = None
        self._cache = None
        self._logits: torch.Tensor | None = None  # the guide's next-token logits for each row

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        guide_logits = _at_least_fp32(self._advance(input_ids))
        if guide_logits.shape != scores.shape:
            raise ValueError(
                f"the guide scores {guide_logits.shape[-1]} tokens but the generating model {scores.shape[-1]}: they "
                "must share a vocabulary"
            )
        base_logp = torch.log_softmax(_at_least_fp32(scores), dim=-1)
        # π_θ of the guide: its own softmax, or for a Q model the base reweighted by exp(Q/β) (E5).
        guide_logp = torch.log_softmax(base_logp + guide_logits if self.q_model else guide_logits, dim=-1)
        guided = base_logp + self.weight * (guide_logp - base_logp)  # log π_ref + A/β_dec (B3)
        # Tokens the base (or an earlier processor) excluded stay excluded, whatever the guide says.
        guided = torch.where(torch.isfinite(base_logp), guided, -torch.inf)
        if 0 < self.top_k < scores.shape[-1]:
            keep = torch.topk(base_logp, self.top_k, dim=-1).indices
            guided = torch.full_like(guided, -torch.inf).scatter(-1, keep, guided.gather(-1, keep))
        return guided.to(scores.dtype)

    def _advance(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The guide's next-token logits ``[N, V]`` after each row of ``input_ids``."""
        parents = self._parents(input_ids)
        if parents is None:  # a new generation: read the prompts
            mask = torch.ones_like(input_ids)
            if self.pad_token_id is not None:
                mask = (
                    (input_ids != self.pad_token_id).long().cummax(dim=-1).values
                )  # zero on the leading pad run only
            self._cache, self._mask = None, mask
            new_tokens = input_ids
        else:
            if self._cache is not None and not torch.equal(parents, torch.arange(len(parents), device=parents.device)):
                self._cache.reorder_cache(parents)
            self._mask = torch.cat([self._mask[parents], self._mask.new_ones(len(parents), 1)], dim=-1)
            new_tokens = input_ids[:, -1:] if self._cache is not None else input_ids
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)[:, -new_tokens.shape[1] :]
        output = self.guide_model(
            input_ids=new_tokens,
            attention_mask=self._mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_key: self._cache},
        )
        self._cache = getattr(output, self._cache_key, None)
        self._fed = input_ids
        return output.logits[:, -1]

    def _parents(self, input_ids: torch.LongTensor) -> torch.Tensor | None:
        """For each row, the index of the previously read row it extends by one token; ``None`` if some row extends
        none."""
        fed = self._fed
        if fed is None or input_ids.shape[1] != fed.shape[1] + 1 or input_ids.shape[0] != fed.shape[0]:
            return None
        prefixes = input_ids[:, :-1]
        if torch.equal(prefixes, fed):
            return torch.arange(len(fed), device=fed.device)
        matches = (prefixes[:, None, :] == fed[None, :, :]).all(dim=-1)  # [rows, previous rows]
        if not matches.any(dim=-1).all():
            return None
        return matches.float().argmax(dim=-1)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in fp32, or in fp64 for fp64 logits (the exact oracle tests rely on it)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def load_guide(options: DecodingOptions, model, tokenizer) -> torch.nn.Module:
    """``options.guide_model`` in ``model``'s dtype, on its device, checked to share the tokenizer."""
    if load_tokenizer(options.guide_model).get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"key 'guide_model': the tokenizer of '{options.guide_model}' differs from the model's; "
            "a guide must share its reference's vocabulary"
        )
    guide = load_model(options.guide_model, dtype=str(model.dtype).removeprefix("torch."), device=model.device).eval()
    if is_q_model(guide) and options.decoding not in ("guided", "beam"):
        raise UserError(
            f"key 'guide_model': '{options.guide_model}' is a Q model (its logits are Q/β beside the model's); scorer "
            "implicit_reward needs a policy guide, a Q model guides decoding guided or beam"
        )
    return guide


def guidance_processors(options: DecodingOptions, tokenizer, guide: torch.nn.Module | None) -> list[LogitsProcessor]:
    """The Q-guidance processor for decoding guided and beam with a guide (``guide``: the loaded
    ``guide_model``, see :func:`load_guide`); no processor otherwise."""
    if guide is None or options.decoding not in ("guided", "beam"):
        return []
    return [
        QGuidedLogitsProcessor(
            guide,
            beta=options.guide_beta,
            guidance_temperature=options.guidance_temperature,
            top_k=options.guidance_top_k,
            pad_token_id=tokenizer.pad_token_id,
            q_model=is_q_model(guide),
        )
    ]
