"""The CPU adapter: declared adapters checked against the installed megatron-core, enable() and
disable() leaving megatron-core and torch exactly as they were, torch untouched, and each
adaptation doing what megatron-core expects. The collectives' CPU allocations (tp-gather,
all-to-all) run across ranks in tests/test_ep_equivalence.py and every EP>1 training run."""

from __future__ import annotations

import types

import pytest
import torch

from epruntime import compat
from epruntime.compat import adapters, megatron_cpu
from epruntime.compat.adapters import ADAPTERS, Adapter

_MISSING = object()
cpu_only = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="checks the CPU path; a CUDA host skips the adapter")


@pytest.fixture
def restore_compat():
    """Leave the adapter as the test found it (request it before monkeypatch, so that it is
    torn down after monkeypatch's undo)."""
    was_enabled = compat.is_enabled()
    yield
    compat.disable()
    if was_enabled:
        compat.enable(force=True)


def _state(adapter_list=ADAPTERS) -> dict:
    """Everything enable() could touch: each target owner's own namespace, and torch.cuda."""
    owners = {}
    for a in adapter_list:
        owner, _ = a.resolve()
        owners[id(owner)] = owner
    state = {(repr(o), k): v for o in owners.values() for k, v in vars(o).items()}
    state[("torch.cuda", "current_device")] = torch.cuda.current_device
    state[("torch.cuda", "Stream")] = torch.cuda.Stream
    return state


def _same(before: dict, after: dict) -> None:
    added, removed = after.keys() - before.keys(), before.keys() - after.keys()
    assert not added and not removed, f"added: {sorted(added)} removed: {sorted(removed)}"
    changed = [k for k in before if before[k] is not after[k]]
    assert not changed, f"changed: {changed}"


def test_rejects_unsupported_megatron(monkeypatch):
    monkeypatch.setattr(megatron_cpu, "megatron_version", lambda: "0.9.0")
    with pytest.raises(compat.MegatronVersionError, match="found megatron-core 0.9.0"):
        megatron_cpu.check_version()


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)
def test_declared_target_exists_as_expected(adapter):
    assert adapter.applies_to(adapters.megatron_version())
    assert adapter.problem() is None


def test_declarations_are_one_per_target_and_listed_in_the_docstring():
    assert len({a.name for a in ADAPTERS}) == len({a.target for a in ADAPTERS}) == len(ADAPTERS)
    assert adapters.render_table() in adapters.__doc__
    table = adapters.render_table(markdown=True)
    assert all(f"`{a.target}`" in table for a in ADAPTERS)


def test_missing_target_is_a_named_version_error(restore_compat, monkeypatch):
    bogus = Adapter("bogus-adapter", "megatron.core.transformer.moe.router:Router.no_such_method",
                    "nothing", "nothing", params=("self",), replacement=lambda original: None)
    version = adapters.megatron_version()
    named = rf"'bogus-adapter' does not fit megatron-core {version}.*no_such_method"
    with pytest.raises(compat.MegatronVersionError, match=named):
        adapters.check((bogus,))
    # enable() checks every declaration before it changes anything
    compat.disable()
    before = _state()
    monkeypatch.setattr(adapters, "ADAPTERS", (*ADAPTERS, bogus))
    with pytest.raises(compat.MegatronVersionError, match="bogus-adapter"):
        compat.enable(force=True)
    assert not compat.is_enabled()
    _same(before, _state())


def test_unexpected_signature_is_a_named_version_error():
    renamed = Adapter("renamed-params", "megatron.core.transformer.moe.router:Router.gating",
                      "nothing", "nothing", params=("self", "hidden_states"))
    named = r"'renamed-params'.*takes \(self, input\).*expects \(self, hidden_states\)"
    with pytest.raises(compat.MegatronVersionError, match=named):
        adapters.check((renamed,))
    elsewhere = Adapter("other-version", "megatron.core.no_such_module:f", "nothing", "nothing",
                        versions=("0.99.",))
    assert adapters.check((elsewhere,)) == []  # declared for another megatron-core: not applied


def test_enable_disable_round_trip_leaves_everything_as_before(restore_compat):
    from megatron.core.transformer.moe import moe_utils

    compat.disable()
    before = _state()
    had_te_gemm = hasattr(moe_utils, "te_general_gemm")
    assert compat.enable(force=True) and compat.enable(force=True)
    assert compat.is_enabled()
    for a in ADAPTERS:
        if a.patched() and not (a.only_if_missing and had_te_gemm):
            owner, name = a.resolve()
            assert name in vars(owner), a.name
            assert vars(owner)[name] is not before.get((repr(owner), name), _MISSING), a.name
    compat.disable()
    assert not compat.is_enabled()
    _same(before, _state())
    assert hasattr(moe_utils, "te_general_gemm") == had_te_gemm  # added, then deleted again


def test_torch_cuda_current_device_is_torchs_own(restore_compat):
    original = torch.cuda.current_device
    compat.enable(force=True)
    assert torch.cuda.current_device is original
    if torch.cuda.is_available():
        assert isinstance(torch.cuda.current_device(), int)
    else:
        with pytest.raises((AssertionError, RuntimeError)):
            torch.cuda.current_device()


@cpu_only
def test_causal_mask_on_cpu(restore_compat):
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    compat.disable()
    with pytest.raises((AssertionError, RuntimeError)):
        utils.get_default_causal_mask(3)  # megatron-core builds it on "cuda"
    compat.enable()
    for fn in (utils.get_default_causal_mask, fused_softmax.get_default_causal_mask):
        mask = fn(3)
        assert mask.device.type == "cpu"
        assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_router_gating_keeps_the_weight_where_it_is(restore_compat):
    from megatron.core.transformer.moe.router import Router

    compat.enable(force=True)
    weight = torch.randn(4, 8)
    router = types.SimpleNamespace(weight=weight, bias=None,
                                   config=types.SimpleNamespace(moe_router_dtype="fp32"))
    x = torch.randn(5, 8)
    logits = Router.gating(router, x)
    assert router.weight is weight and logits.dtype == torch.float32
    torch.testing.assert_close(logits, x @ weight.T)


def test_global_buffer_is_allocated_on_cpu_and_reused(restore_compat):
    from megatron.core.utils import GlobalMemoryBuffer

    compat.enable(force=True)
    buf = GlobalMemoryBuffer()
    big = buf.get_tensor((2, 3), torch.float32, "mpu")
    small = buf.get_tensor((5,), torch.float32, "mpu")
    assert big.device.type == "cpu" and big.shape == (2, 3) and small.shape == (5,)
    assert small.data_ptr() == big.data_ptr()  # megatron-core's reuse rule, unchanged


@cpu_only
def test_rng_tracker_forks_cpu_state(restore_compat):
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


@cpu_only
def test_manual_seed_takes_an_explicit_rank_zero(restore_compat, monkeypatch):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    compat.enable()
    for getter in ("get_tensor_model_parallel_rank", "get_expert_model_parallel_rank",
                   "get_expert_tensor_parallel_rank"):
        monkeypatch.setattr(ps, getter, lambda: 3)  # what parallel_state would say
    compat.cpu_model_parallel_manual_seed(10, tp_rank=0, ep_rank=0, etp_rank=0)
    assert mrandom.get_cuda_rng_tracker().seeds_ == {10, 10 + 2718, 10 + 1024}
    compat.cpu_model_parallel_manual_seed(10)
    assert mrandom.get_cuda_rng_tracker().seeds_ == {10, 10 + 2718 + 3, 10 + 1024 + 300 + 3}


def _dispatcher_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, num_moe_experts=4,
        moe_router_topk=2, moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
        moe_permute_fusion=False, params_dtype=torch.float32)


@pytest.fixture
def world_of_one():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    group = dist.group.WORLD
    yield types.SimpleNamespace(ep=group, expt_tp=group, tp_ep=group)
    dist.destroy_process_group()


@cpu_only
def test_cpu_dispatcher_needs_no_base_class_patch(restore_compat, monkeypatch, world_of_one):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from epruntime.compat.dispatcher import CpuAlltoAllTokenDispatcher, no_dtoh_stream

    monkeypatch.setattr(adapters, "PATCH_BASE_DISPATCHER", False)
    compat.disable()
    compat.enable()
    assert "_maybe_dtoh_and_synchronize" in vars(MoEAlltoAllTokenDispatcher)  # megatron's own
    assert MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None
    config, experts = _dispatcher_config(), [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="CUDA"):  # megatron-core's own makes a CUDA stream
        MoEAlltoAllTokenDispatcher(4, experts, config=config, pg_collection=world_of_one)
    with no_dtoh_stream():  # as MoELayer.__init__ must be, where it builds megatron-core's own
        MoEAlltoAllTokenDispatcher(4, experts, config=config, pg_collection=world_of_one)
    dispatcher = CpuAlltoAllTokenDispatcher(4, experts, config=config, pg_collection=world_of_one)
    assert dispatcher.cpu_adapted and MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None

    hidden = torch.randn(6, 8)
    routing_map = torch.zeros(6, 4, dtype=torch.bool)
    routing_map[torch.arange(6), torch.arange(6) % 4] = True
    routing_map[torch.arange(6), (torch.arange(6) + 1) % 4] = True
    h, p = dispatcher.dispatch_preprocess(hidden, routing_map, routing_map * 0.5)
    h, p = dispatcher.token_dispatch(h, p)
    h, tokens_per_expert, p = dispatcher.dispatch_postprocess(h, p)
    assert tokens_per_expert.tolist() == routing_map.sum(0).tolist()
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(h)))
    # identity experts: combine sums each token's two rows (the experts apply the probabilities)
    torch.testing.assert_close(out, 2 * hidden)

    dispatcher.input_splits = torch.tensor([3, 1])
    dispatcher.output_splits = torch.tensor([2, 2])
    dispatcher._maybe_dtoh_and_synchronize(dispatcher.cuda_dtoh_point)
    assert dispatcher.input_splits.tolist() == [3, 1]
    assert type(dispatcher.input_splits).__module__ == "numpy"  # as after megatron-core's copy


@cpu_only
def test_cpu_dispatcher_off_cpu_is_megatrons(restore_compat, monkeypatch, world_of_one):
    """Where cpu_mode() is False (a CUDA host) every step is megatron-core's: here, on a CPU
    build, that shows as megatron-core's own CUDA calls failing."""
    from epruntime.compat import dispatcher as cpu_dispatcher

    monkeypatch.setattr(adapters, "PATCH_BASE_DISPATCHER", False)
    compat.disable()
    compat.enable()
    monkeypatch.setattr(cpu_dispatcher, "cpu_mode", lambda: False)
    config = _dispatcher_config()
    with pytest.raises(RuntimeError, match="CUDA"):
        cpu_dispatcher.CpuAlltoAllTokenDispatcher(4, [0, 1, 2, 3], config=config,
                                                  pg_collection=world_of_one)
    with cpu_dispatcher.no_dtoh_stream(), pytest.raises(RuntimeError, match="CUDA"):
        cpu_dispatcher.CpuAlltoAllTokenDispatcher(4, [0, 1, 2, 3], config=config,
                                                  pg_collection=world_of_one)


@cpu_only
def test_stock_dispatcher_runs_megatrons_own_on_cpu_and_undoes(restore_compat, monkeypatch,
                                                                world_of_one):
    """enable(stock_dispatcher=True): megatron-core's own MoEAlltoAllTokenDispatcher (as its stock
    MoELayer builds it) constructs and dispatches on CPU; disable() restores the class."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    monkeypatch.setattr(adapters, "PATCH_BASE_DISPATCHER", False)
    compat.disable()
    before = _state()
    compat.enable()  # without: megatron-core's own dispatcher makes a CUDA stream
    with pytest.raises(RuntimeError, match="CUDA"):
        MoEAlltoAllTokenDispatcher(4, [0, 1, 2, 3], config=_dispatcher_config(),
                                   pg_collection=world_of_one)
    assert compat.enable(stock_dispatcher=True)  # added on top of the enabled adapter
    dispatcher = MoEAlltoAllTokenDispatcher(4, [0, 1, 2, 3], config=_dispatcher_config(),
                                            pg_collection=world_of_one)
    hidden = torch.randn(6, 8)
    routing_map = torch.zeros(6, 4, dtype=torch.bool)
    routing_map[torch.arange(6), torch.arange(6) % 4] = True
    h, p = dispatcher.dispatch_preprocess(hidden, routing_map, routing_map * 1.0)
    h, p = dispatcher.token_dispatch(h, p)
    h, tokens_per_expert, p = dispatcher.dispatch_postprocess(h, p)
    assert tokens_per_expert.tolist() == routing_map.sum(0).tolist()
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(h)))
    torch.testing.assert_close(out, hidden)
    compat.disable()
    _same(before, _state())


@cpu_only
def test_grad_norm_and_clip_are_megatrons_on_cpu(restore_compat, world_of_one):
    """megatron-core's get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 (as the optimizer calls
    them) on CPU gradients: the whole-list L2 norm, and an in-place scale to max_norm."""
    from megatron.core.optimizer import clip_grads, optimizer as moptimizer

    compat.enable()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    want = torch.cat([p.grad.double().flatten() for p in params]).norm().item()
    norm = moptimizer.get_grad_norm_fp32([p.grad for p in params],
                                         grad_stats_parallel_group=world_of_one.ep)
    assert norm == pytest.approx(want, rel=1e-6)
    assert clip_grads.get_grad_norm_fp32([p.grad for p in params], 2,
                                         world_of_one.ep) == pytest.approx(want, rel=1e-6)
    before = [p.grad.clone() for p in params]
    clip_grads.clip_grad_by_total_norm_fp32(params, 1.0, norm)
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * (1.0 / (norm + 1e-6)))
    clip_grads.clip_grad_by_total_norm_fp32(params, 1e9, 1.0)  # below max_norm: unchanged
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * (1.0 / (norm + 1e-6)))


@cpu_only
def test_ddp_grad_buffer_on_cpu_leaves_torch_as_it_is(restore_compat, world_of_one):
    """_ParamAndGradBuffer on CPU parameters: megatron-core's layout in a CPU buffer, while
    torch.cuda.current_device() outside that one function is still torch's own."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.process_groups_config import ProcessGroupCollection

    compat.enable()
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    names = {p: f"p{i}" for i, p in enumerate(params)}
    groups = ProcessGroupCollection()
    groups.tp = groups.dp_cp = world_of_one.ep  # as DistributedDataParallel passes them
    buffer = _ParamAndGradBuffer(DistributedDataParallelConfig(), torch.float, torch.float,
                                 params, world_of_one.ep, None, names, 1.0, [0, 1], False, groups)
    assert buffer.grad_data.device.type == "cpu" and buffer.grad_data.numel() >= 17
    for p in params:  # every parameter's main_grad is a view of the one buffer
        assert p.main_grad.shape == p.shape
        assert p.main_grad.untyped_storage().data_ptr() == buffer.grad_data.untyped_storage().data_ptr()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
