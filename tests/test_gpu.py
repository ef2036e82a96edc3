"""The CUDA paths that a CPU never runs: bf16 ShiQ steps, guided decoding with the guide's KV cache on the device, and
a Q model guiding a larger model. Tiny random models only (the GPU machine cannot download); run there by
``bench/gpu_check.sh``."""

import copy

import pytest
import torch
from conftest import make_shiq_trainer
from transformers import LogitsProcessorList

from llmq.decoding import QGuidedLogitsProcessor
from llmq.models import load_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_check.sh)"),
]


def shiq_losses(tmp_path, *, cuda: bool, bf16: bool) -> list[float]:
    trainer = make_shiq_trainer(load_tokenizer("tiny-llama"), tmp_path, use_cpu=not cuda, bf16=bf16, report_to="none")
    trainer.train()
    assert next(trainer.model.parameters()).device.type == ("cuda" if cuda else "cpu")
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_shiq_steps_on_cuda_match_the_cpu_in_fp32_and_stay_close_in_bf16(tmp_path, tiny_model_dir):
    cpu = shiq_losses(tmp_path / "cpu", cuda=False, bf16=False)
    assert shiq_losses(tmp_path / "fp32", cuda=True, bf16=False) == pytest.approx(cpu, rel=1e-4)
    assert shiq_losses(tmp_path / "bf16", cuda=True, bf16=True) == pytest.approx(cpu, rel=5e-2)


@pytest.mark.parametrize("q_model", [False, True])
def test_guided_generation_on_cuda_matches_the_cpu(tiny_model_and_tokenizer, q_model):
    base, tokenizer = copy.deepcopy(tiny_model_and_tokenizer)
    guide = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in guide.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    tokenizer.padding_side = "left"
    prompts = ["Q: 2+3?", "Question: what is 7 times 6, exactly?"]
    outputs = []
    for device in ("cpu", "cuda"):
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        processor = QGuidedLogitsProcessor(
            guide.to(device), beta=0.1, top_k=5, pad_token_id=tokenizer.pad_token_id, q_model=q_model
        )
        outputs.append(
            base.to(device)
            .generate(
                **encoded,
                do_sample=False,
                max_new_tokens=12,
                num_beams=2,
                logits_processor=LogitsProcessorList([processor]),
                pad_token_id=tokenizer.pad_token_id,
            )
            .cpu()
        )
    assert torch.equal(outputs[0], outputs[1])
