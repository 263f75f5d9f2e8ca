"""Train a plain megatron-core GPTModel (text only) with epruntime's plug-in, on synthetic tokens.

    torchrun --standalone --nproc-per-node=2 launch/plugin_gpt.py --ep 2 --steps 5
    torchrun --standalone --nproc-per-node=2 launch/plugin_gpt.py --dispatcher alltoall
    torchrun --standalone --nproc-per-node=2 launch/plugin_gpt.py --dispatcher stock  # baseline

The model is megatron-core's own: `get_gpt_decoder_block_spec` (Transformer Engine modules where
TE and CUDA are there, local ones otherwise), `GPTModel`. `--dispatcher dedup|dedup-hier|alltoall`
plugs epruntime's dispatcher in (`epruntime.plugin.plug` / `attach`) and prints its CommLedger;
`--dispatcher stock` builds the unmodified stock spec, megatron-core choosing its own alltoall
dispatcher from the config, for comparison. Weights are initialised from (seed, global parameter
name), so every variant and EP size starts from the same model; each data-parallel rank draws its
own sequences of a fixed affine recurrence (x[t+1] = (a x[t] + b) mod V, a and b per sequence from
a small set), which the model can learn.

Loss convention (as epruntime's engine): each rank's loss is its token sum over the global token
count; dense gradients are summed over the data-parallel group, expert gradients over the
expert-data-parallel group (their all-to-all backward already summed the EP group's tokens).
`--out PATH` writes per-step losses, the initial weights' fingerprint and the ledger (rank 0).
Bad arguments exit 2 with the argument named.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `torchrun launch/plugin_gpt.py` puts launch/ first
    sys.path.insert(0, str(ROOT))

EXIT_USAGE = 2
_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(\.)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size (divides the world)")
    p.add_argument("--dispatcher", default="dedup",
                   choices=["dedup", "dedup-hier", "alltoall", "stock"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--seq-len", dest="seq_len", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="sequences per data-parallel rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ranks-per-node", dest="ranks_per_node", type=int,
                   help="EP ranks per node (dedup-hier); default LOCAL_WORLD_SIZE")
    p.add_argument("--timeout-s", dest="timeout_s", type=float, default=300.0)
    p.add_argument("--out", help="rank 0 writes the losses and the ledger here (JSON)")
    args = p.parse_args(argv)
    for name in ("ep", "steps", "layers", "hidden", "heads", "experts", "topk", "vocab",
                 "seq_len", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.topk > args.experts:
        p.error(f"--topk {args.topk} is larger than --experts {args.experts}")
    if args.experts % args.ep:
        p.error(f"--experts {args.experts} is not divisible by --ep {args.ep}")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.ep:
        p.error(f"--ep {args.ep} does not divide the world size {world} (torchrun "
                "--nproc-per-node x --nnodes)")
    return args


def transformer_config(args, cuda: bool):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, num_moe_experts=args.experts,
        moe_router_topk=args.topk, moe_ffn_hidden_size=2 * args.hidden,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        moe_token_dispatcher_type="alltoall", expert_model_parallel_size=args.ep,
        params_dtype=torch.float32, use_cpu_initialization=not cuda,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        # Fusions are CUDA kernels; the unfused paths compute the same.
        gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        moe_permute_fusion=False)


def global_name(name: str, ep_rank: int, num_local: int) -> str:
    """Expert slot -> logical expert under megatron-core's contiguous placement."""
    return _EXPERT.sub(lambda m: f"{m[1]}{ep_rank * num_local + int(m[2])}{m[3]}", name)


def init_weights_(model, seed: int, ep_rank: int, num_local: int, num_layers: int) -> str:
    """Every parameter from a generator seeded by (seed, global name): the same model at any EP
    size and with any dispatcher. Returns a fingerprint of this rank's initial weights by global
    name (sha256 of name and bytes)."""
    import torch

    digest = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = global_name(name, ep_rank, num_local)
            key = int.from_bytes(hashlib.sha256(f"{seed}:{gname}".encode()).digest()[:8], "little")
            gen = torch.Generator().manual_seed(key)
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in gname and gname.endswith("weight") else 0.0)
            else:
                scaled = gname.endswith(("linear_proj.weight", "linear_fc2.weight"))
                std = 0.02 / (2 * num_layers) ** 0.5 if scaled else 0.02
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            digest[gname] = hashlib.sha256(param.detach().cpu().numpy().tobytes()).hexdigest()
    return json.dumps(digest, sort_keys=True)


def synthetic_batch(seed: int, step: int, dp_rank: int, batch: int, seq_len: int, vocab: int):
    """input_ids, labels [batch, seq_len]: x[t+1] = (a x[t] + b) mod vocab, labels shifted."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + dp_rank)
    a = torch.tensor([1, 3, 5, 7])[torch.randint(0, 4, (batch, 1), generator=gen)]
    b = torch.randint(1, 4, (batch, 1), generator=gen)
    x = torch.empty(batch, seq_len + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for t in range(seq_len):
        x[:, t + 1] = (a[:, 0] * x[:, t] + b[:, 0]) % vocab
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from epruntime import plugin

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    cuda = torch.cuda.is_available()
    # CPU: megatron-core's CUDA assumptions adapted (megatron-core's own dispatcher too for the
    # stock baseline). GPU: megatron-core runs untouched.
    plugin.cpu_ready(stock_dispatcher=args.dispatcher == "stock")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout_s))
    try:
        return train(args, cuda)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def train(args, cuda: bool) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from epruntime import compat, plugin

    ps.initialize_model_parallel(expert_model_parallel_size=args.ep)
    if compat.is_enabled():
        compat.cpu_model_parallel_manual_seed(args.seed)
    else:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.manual_seed(args.seed)
        model_parallel_cuda_manual_seed(args.seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    ep_rank, dp_size = ps.get_expert_model_parallel_rank(), ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    config = transformer_config(args, cuda)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=cuda and
                                      plugin.transformer_engine_available())
    ep = None
    if args.dispatcher != "stock":
        per_node = args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        plugged = plugin.plug(config, spec, dispatcher=args.dispatcher, ledger=True,
                              ranks_per_node=min(per_node, args.ep))
        spec = plugged.spec
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq_len, position_embedding_type="learned_absolute",
                     share_embeddings_and_output_weights=False)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model.to(device)
    if args.dispatcher != "stock":
        ep = plugin.attach(model, plugged)
    num_local = args.experts // args.ep
    fingerprint = init_weights_(model, args.seed, ep_rank, num_local, args.layers)
    fingerprints: list = [None] * world
    dist.all_gather_object(fingerprints, fingerprint)
    merged = {}
    for f in fingerprints:
        merged.update(json.loads(f))
    weights_sha = hashlib.sha256(json.dumps(merged, sort_keys=True).encode()).hexdigest()

    expert = [p for n, p in model.named_parameters() if _EXPERT.search(n)]
    dense = [p for n, p in model.named_parameters() if not _EXPERT.search(n)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0, foreach=False)
    position_ids = torch.arange(args.seq_len, device=device)[None].expand(args.batch, -1)
    global_tokens = args.batch * args.seq_len * dp_size
    losses = []
    for step in range(args.steps):
        input_ids, labels = synthetic_batch(args.seed, step, dp_rank, args.batch, args.seq_len,
                                            args.vocab)
        optimizer.zero_grad(set_to_none=True)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / dp_size, device=device))
        token_loss = model(input_ids.to(device), position_ids, attention_mask=None,
                           labels=labels.to(device))
        loss = token_loss.sum() / global_tokens
        loss.backward()
        for params, group in ((dense, ps.get_data_parallel_group()),
                              (expert, ps.get_expert_data_parallel_group())):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(p.grad, group=group)
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        losses.append(total.item())  # host sync: the logged loss
        if rank == 0:
            print(f"step {step}: loss {losses[-1]:.6f}", flush=True)
    ledger = ep.ledger.summary(dist.group.WORLD) if ep is not None and ep.ledger else None
    from megatron.core.transformer.moe.moe_layer import MoELayer

    classes = sorted({f"{type(m.token_dispatcher).__module__}.{type(m.token_dispatcher).__name__}"
                      for m in model.modules() if isinstance(m, MoELayer)})
    if rank == 0:
        if ledger is not None:
            print(f"ledger ({args.dispatcher}): rows sent {ledger['rows_sent']}, floor "
                  f"{ledger['floor_rows']}, cross-rank bytes {ledger['cross_rank_bytes']}",
                  flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({
                "dispatcher": args.dispatcher, "ep": args.ep, "world": world, "losses": losses,
                "dispatcher_classes": classes, "weights_sha256": weights_sha, "ledger": ledger}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
