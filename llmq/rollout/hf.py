"""The default engine: transformers ``generate``, batched with left padding and the KV cache; runs on a CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from llmq.mdp import token_logprobs
from llmq.rollout.base import Completion, Prompt, SamplingParams


class HFEngine:
    """Generate with a loaded transformers causal LM.

    Args:
        model: a ``PreTrainedModel`` (or PEFT model) already on its device.
        tokenizer: its tokenizer; chat prompts use ``tokenizer.chat_template``.
        batch_size: prompts per ``generate`` call (each expanded to ``n`` sequences).
        progress: show a progress bar over batches.
        logits_processor: processors applied to every step's scores before temperature and
            top-k/top-p, e.g. a :class:`llmq.decoding.QGuidedLogitsProcessor`.  Completions'
            ``logprobs`` stay those of ``model`` itself.
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 8,
        progress: bool = True,
        logits_processor: Sequence[LogitsProcessor] = (),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.logits_processor = LogitsProcessorList(logits_processor)

    def render(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(
        self, prompts: list[Prompt], n: int = 1, sampling: SamplingParams = SamplingParams()
    ) -> list[list[Completion]]:
        results: list[list[Completion]] = []
        batches = range(0, len(prompts), self.batch_size)
        for batch_number, start in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not self.progress)):
            texts = [self.render(p) for p in prompts[start : start + self.batch_size]]
            results += self._generate_batch(texts, n, sampling, seed=sampling.seed + batch_number)
        return results

    def _generate_batch(self, texts: list[str], n: int, sampling: SamplingParams, seed: int) -> list[list[Completion]]:
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        # Chat templates already contain the special tokens they need.
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        beam = sampling.num_beams > 1
        if n > sampling.num_beams and beam:
            raise ValueError(
                f"beam search returns at most num_beams={sampling.num_beams} sequences per prompt, {n} asked for"
            )
        greedy = sampling.temperature == 0 or beam
        options = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=n,
            return_dict_in_generate=True,
            output_logits=not beam,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=self.logits_processor,
        )
        if not greedy:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        else:  # override sampling defaults a model's generation_config may carry
            options.update(temperature=None, top_p=None, top_k=None)
        if beam:
            options.update(num_beams=sampling.num_beams, length_penalty=0.0)
        if sampling.stop:
            options.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
        with torch.random.fork_rng(devices=[self.model.device] if self.model.device.type == "cuda" else []):
            torch.manual_seed(seed)
            output = self.model.generate(**encoded, **options)
        new_tokens = output.sequences[:, encoded["input_ids"].shape[1] :]
        if beam:  # beams are reordered as they go: score the final sequences in one forward pass
            logprobs = self._sequence_logprobs(output.sequences, encoded["attention_mask"].repeat_interleave(n, dim=0))
        else:
            # Raw logits (before temperature / top-p), one step at a time: stacking them all and taking
            # a full log_softmax would copy every step's [B, V] scores twice more.
            logprobs = torch.stack(
                [
                    step.float().gather(-1, new_tokens[:, t, None]).squeeze(-1) - torch.logsumexp(step.float(), dim=-1)
                    for t, step in enumerate(output.logits)
                ],
                dim=1,
            )
        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {tokenizer.eos_token_id}

        completions = []
        for row in range(new_tokens.shape[0]):
            ids = new_tokens[row].tolist()
            # Generation ends at the first EOS or after the token that completes a stop string; padding
            # follows, and the pad token may be the EOS token (SmolLM2's is): a row that a stop string
            # ended before the others is padded with what looks like an EOS, which it did not generate.
            end = next((position for position, token in enumerate(ids) if token in eos_ids), len(ids))
            text = tokenizer.decode(ids[:end], skip_special_tokens=True)
            stops = [text.index(stop) for stop in sampling.stop if stop in text]
            if stops:
                length, text = end, text[: min(stops)]
            else:
                length = min(end + 1, len(ids))
            completions.append(
                Completion(
                    text=text,
                    token_ids=ids[:length],
                    logprobs=logprobs[row, :length].tolist(),
                    finish_reason="stop" if stops or end < len(ids) else "length",
                )
            )
        return [completions[i * n : (i + 1) * n] for i in range(len(texts))]

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""

    def _sequence_logprobs(self, sequences: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """``log π(token)`` of each generated token ``[N, new tokens]``, the prompts left-padded as in ``generate``."""
        mask = torch.cat(
            [prompt_mask, prompt_mask.new_ones(len(sequences), sequences.shape[1] - prompt_mask.shape[1])], dim=1
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=sequences, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logprobs, _ = token_logprobs(logits, sequences)
        return logprobs[:, prompt_mask.shape[1] :]
