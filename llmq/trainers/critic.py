"""Q/V heads on frozen features, trained by offline TD: Digi-Q's critic (§5.5) and Q*'s QVM (§4.5).

The backbone never runs here: :func:`llmq.models.features.extract_features` computes the features
once, and this trainer fits :class:`llmq.models.value_heads.CriticHeads` to them with
:func:`llmq.losses.td_loss`, moving a Polyak target copy after every ``target_update_steps``
optimizer steps.  For Digi-Q the policy is improved afterwards by Best-of-N extraction
(:func:`llmq.losses.best_of_n_advantages`) and supervised fine-tuning on the chosen actions.  With
every transition terminal the Q target is the reward itself: plain regression on labels, which is
how ``llmq train --method qvm`` fits Q*'s Q-value model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from llmq.losses import td_loss
from llmq.models.value_heads import CriticHeads, DigiQCritic
from llmq.trainers.metrics import LossMetricsTrainer

FEATURE_COLUMNS = ("state_features", "action_features", "next_state_features")


@dataclass
class CriticConfig(TrainingArguments):
    """Training arguments of :class:`CriticTrainer` (everything else as in ``TrainingArguments``).

    Args:
        gamma: discount per environment step (Digi-Q: 0.95).
        target_update_rate: Polyak rate τ of the target heads, ``θ̄ ← (1 − τ)θ̄ + τθ`` (Digi-Q: 0.1).
        target_update_steps: optimizer steps between target updates (Digi-Q: once per critic epoch).
        expectile: ``None`` for Digi-Q's plain MSE on V (behaviour values); τ ∈ (0.5, 1) for an
            IQL-style expectile V that leans towards the best logged actions.
        hidden_size: width of the heads' hidden layers.
        num_layers: hidden layers per head (0: linear heads).
        num_heads: Q heads and V heads (each Q_i backs up from its own V_i).
    """

    gamma: float = field(default=0.95, metadata={"help": "Discount per environment step."})
    target_update_rate: float = field(
        default=0.1, metadata={"help": "Polyak rate of the target heads (1 copies them)."}
    )
    target_update_steps: int = field(default=10, metadata={"help": "Optimizer steps between target updates."})
    expectile: float | None = field(
        default=None, metadata={"help": "None: MSE value regression (behaviour values); in (0.5, 1): expectile (IQL)."}
    )
    hidden_size: int = field(default=256, metadata={"help": "Width of the heads' hidden layers."})
    num_layers: int = field(default=2, metadata={"help": "Hidden layers per head (0: linear heads)."})
    num_heads: int = field(default=2, metadata={"help": "Q heads and V heads."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate of the heads."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the feature columns (the critic's collator needs them)."}
    )

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0 < self.target_update_rate <= 1 or self.target_update_steps < 1:
            raise ValueError("target_update_rate must be in (0, 1] and target_update_steps >= 1")
        if self.expectile is not None and not 0 < self.expectile < 1:
            raise ValueError(f"expectile must be in (0, 1), got {self.expectile}")
        super().__post_init__()


def critic_config(training_args, output_dir: str, steps: int, **fields) -> CriticConfig:
    """A :class:`CriticConfig` for a critic fitted inside a larger run: the run's device, seed,
    logging and progress settings, ``steps`` optimizer steps, no checkpoints; ``fields`` set the rest."""
    return CriticConfig(
        output_dir=output_dir,
        max_steps=steps,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=training_args.report_to,
        use_cpu=training_args.use_cpu,
        seed=training_args.seed,
        disable_tqdm=training_args.disable_tqdm,
        **fields,
    )


def collate_transitions(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows with ``state_features``, ``action_features``, ``next_state_features``, ``reward``, ``done``
    (and optionally ``weight``, e.g. importance weights) → tensors."""
    for index, row in enumerate(rows):
        missing = [key for key in (*FEATURE_COLUMNS, "reward", "done") if key not in row]
        if missing:
            raise ValueError(
                f"transition row {index} lacks {missing}; build rows with llmq.models.features.extract_features"
            )
    batch = {key: torch.tensor([row[key] for row in rows], dtype=torch.float32) for key in FEATURE_COLUMNS}
    batch["reward"] = torch.tensor([float(row["reward"]) for row in rows])
    batch["done"] = torch.tensor([float(row["done"]) for row in rows])
    if "weight" in rows[0]:
        batch["weight"] = torch.tensor([float(row["weight"]) for row in rows])
    return batch


class _UpdateTarget(TrainerCallback):
    def __init__(self, critic: DigiQCritic, rate: float, every: int) -> None:
        self.critic, self.rate, self.every = critic, rate, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.critic.update_target(self.rate)


class CriticTrainer(LossMetricsTrainer):
    """Fits Q/V heads to logged transitions on frozen features (TRL-style trainer + config pair).

    Args:
        model: a :class:`DigiQCritic`; ``None`` builds one from the config and the dataset's feature widths.
        args: a :class:`CriticConfig`.
        train_dataset: transitions with ``state_features``, ``action_features``,
            ``next_state_features`` (float lists), ``reward``, ``done`` and optionally ``weight``.
        eval_dataset: the same columns, for held-out TD error.
        callbacks: extra ``TrainerCallback``s.

    Logged metrics: ``loss``, ``q/mean``, ``v/mean``, ``td_error/abs_mean``.
    """

    def __init__(
        self,
        model: DigiQCritic | None = None,
        args: CriticConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        callbacks=None,
    ) -> None:
        args = args if args is not None else CriticConfig(output_dir="outputs/digiq_critic")
        if model is None:
            set_seed(args.seed)  # the heads' initialisation is the run's, as the Trainer seeds a model_init
            first = train_dataset[0]
            heads = CriticHeads(
                len(first["state_features"]),
                len(first["action_features"]),
                args.hidden_size,
                args.num_layers,
                args.num_heads,
            )
            model = DigiQCritic(heads)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collate_transitions,
            callbacks=[_UpdateTarget(model, args.target_update_rate, args.target_update_steps), *(callbacks or [])],
        )

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        with torch.no_grad():
            target_q = model.target.q(inputs["state_features"], inputs["action_features"])
            target_v_next = model.target.v(inputs["next_state_features"])
        q = model.online.q(inputs["state_features"], inputs["action_features"])
        v = model.online.v(inputs["state_features"])
        loss, metrics = td_loss(
            q,
            v,
            target_q=target_q,
            target_v_next=target_v_next,
            rewards=inputs["reward"],
            dones=inputs["done"],
            gamma=self.args.gamma,
            expectile=self.args.expectile,
            weights=inputs.get("weight"),
        )
        self.record_metrics(metrics, model.training)
        return (loss, {"q": q, "v": v}) if return_outputs else loss
