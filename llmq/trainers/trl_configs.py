"""TRL's DPO, SFT and GRPO trainers, reused as they are: llmq only fixes one default of their configs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import trl


class _BF16FollowsHardware:
    """``bf16`` follows the hardware when not set: TRL turns it on unconditionally, which stops a
    CPU run (and bf16 is ~175x slower than fp32 on CPUs without AMX)."""

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()


@dataclass
class DPOConfig(_BF16FollowsHardware, trl.DPOConfig):
    """TRL's ``DPOConfig`` (for ``trl.DPOTrainer``) whose ``bf16`` follows the hardware when not set."""


@dataclass
class SFTConfig(_BF16FollowsHardware, trl.SFTConfig):
    """TRL's ``SFTConfig`` (for ``trl.SFTTrainer``) whose ``bf16`` follows the hardware when not set."""


@dataclass
class GRPOConfig(_BF16FollowsHardware, trl.GRPOConfig):
    """TRL's ``GRPOConfig`` (for ``trl.GRPOTrainer``) whose ``bf16`` follows the hardware when not set."""
