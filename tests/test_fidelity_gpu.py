"""On CUDA the fidelity levers mean on the Triton backend what they mean on the torch one: the prompt-aware
seed (written by the flash-attention prefill path) and the recall guard (which sends a sequence's first
sparse decode step to the torch path to measure it); the adaptive levers (top-p, drift) are refused
there. Same random Llama and prompts as test_gpu_parity."""

from __future__ import annotations

import pytest
import torch
from test_gpu_parity import greedy, model_path, prompts  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LEVERS = {"observation-window": {"sparse_observation_window": 32},
          "min-recall": {"sparse_min_recall": 0.9, "sparse_observation_window": 32}}


@pytest.mark.parametrize("lever", list(LEVERS))
def test_triton_equals_torch_with_the_fidelity_levers(model_path, prompts, lever):  # noqa: F811
    kw = {"prefill_local_tokens": 256, **LEVERS[lever]}  # prompts past the window prefill sparsely
    want = greedy(model_path, prompts, "sparse", attention_backend="torch", **kw)
    got = greedy(model_path, prompts, "sparse", attention_backend="triton", **kw)
    assert got == want


@pytest.mark.parametrize("flag", [{"sparse_top_p": 0.9}, {"sparse_drift": 0.8}])
def test_triton_refuses_the_adaptive_levers(model_path, flag):  # noqa: F811
    """The Triton selection kernel fills a fixed k on one schedule: the flags name the torch backend."""
    with pytest.raises(ValueError, match="torch attention backend only"):
        greedy(model_path, [[1, 2, 3]], "sparse", attention_backend="triton", **flag)
