"""The CPU adapter: version gate, idempotence, and each adaptation doing what megatron expects."""

import pytest
import torch

from epruntime import compat
from epruntime.compat import megatron_cpu


def test_rejects_unsupported_megatron(monkeypatch):
    monkeypatch.setattr(megatron_cpu, "megatron_version", lambda: "0.9.0")
    with pytest.raises(compat.MegatronVersionError, match="found megatron-core 0.9.0"):
        megatron_cpu.check_version()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path; a CUDA host skips the adapter")
def test_enable_is_idempotent_and_reversible():
    from megatron.core.transformer import utils

    compat.disable()
    assert not compat.is_enabled()
    with pytest.raises((AssertionError, RuntimeError)):
        utils.get_default_causal_mask(3)  # megatron-core builds it on "cuda"
    assert compat.enable() and compat.enable()
    mask = utils.get_default_causal_mask(3)
    assert mask.device.type == "cpu"
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    assert torch.cuda.current_device() == torch.device("cpu")
    compat.disable()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    compat.enable()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path; a CUDA host skips the adapter")
def test_rng_tracker_forks_cpu_state():
    from megatron.core.tensor_parallel import random as mrandom

    compat.enable()
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 7)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(2)
    assert torch.equal(torch.rand(1), before)  # the default stream is untouched by the fork
    with tracker.fork("a"):
        second = torch.rand(2)
    assert torch.equal(first, torch.rand(2, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(first, second)  # the named state advanced
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("missing"):
            pass
