"""DPO through TRL's ``DPOTrainer``: llmq reuses TRL's trainer and only fixes one default."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import trl


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL's ``DPOConfig`` whose ``bf16`` follows the hardware when not set: TRL turns it on
    unconditionally, which stops a CPU run (and bf16 is ~175x slower than fp32 on CPUs without AMX)."""

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()
