"""FLOPs of one MoE layer per token, from the model shape, and its compute time on one GPU.

Counts matrix multiplies only (2 FLOPs per multiply-add); norms, activations, softmax and the
router's top-k are left out (a few percent). Training costs 3x the forward (the backward
computes gradients for inputs and for weights).

Attention: MLA (DeepSeek-V2/V3, Kimi-VL's Moonlight) projections q (through a rank-`q_lora`
bottleneck or directly), the joint kv down-projection (kv_lora + rope dims), kv up-projection,
output; plus scores and weighted values over a causal context of `seq_len` tokens (mean
context seq_len / 2).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ModelShape", "SHAPES", "layer_flops", "ACHIEVED_TFLOPS_H100"]

# Achieved training throughput of DeepSeek-V3 on 1,024 H100s with Megatron-Core (FP8 blockwise,
# TP2 PP4 EP64): 368 TFLOP/s per GPU, 1,412 tokens/s per GPU (NVIDIA, "Scalable Training of
# Mixture-of-Experts Models with Megatron Core", performance table; Megatron-LM MoE recipes).
# It is the end-to-end figure, communication included, so as a rate of compute alone it is low:
# projected all-to-all shares are conservative.
ACHIEVED_TFLOPS_H100 = 368.0


class ModelShape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    hidden: int = Field(gt=0)
    moe_layers: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    topk: int = Field(gt=0)
    moe_ffn_hidden: int = Field(gt=0)
    shared_experts: int = Field(0, ge=0)
    heads: int = Field(gt=0)
    qk_nope_dim: int = 128
    qk_rope_dim: int = 64
    v_dim: int = 128
    q_lora: int | None = None
    kv_lora: int = 512
    seq_len: int = Field(4096, gt=0)
    node_limit: int | None = Field(None, description="nodes a token may route to (V3: 4)")
    source: str = ""


SHAPES: dict[str, ModelShape] = {s.name: s for s in [
    ModelShape(name="deepseek-v3", hidden=7168, moe_layers=58, num_experts=256, topk=8,
               moe_ffn_hidden=2048, shared_experts=1, heads=128, q_lora=1536, kv_lora=512,
               seq_len=4096, node_limit=4,
               source="DeepSeek-V3 technical report (arXiv 2412.19437): 61 layers (first 3 dense), "
                      "256 routed + 1 shared expert of width 2048, top-8, at most 4 nodes per "
                      "token, MLA with 128 heads, q/kv LoRA ranks 1536/512, 4K pretraining"),
    ModelShape(name="kimi-vl", hidden=2048, moe_layers=26, num_experts=64, topk=6,
               moe_ffn_hidden=1408, shared_experts=2, heads=16, q_lora=None, kv_lora=512,
               seq_len=8192,
               source="Kimi-VL-A3B (arXiv 2504.07491; Moonlight config): 27 layers (first dense), "
                      "hidden 2048, 64 routed + 2 shared experts of width 1408, top-6, MLA with 16 "
                      "heads, kv LoRA rank 512; 8K multimodal sequences"),
]}


def layer_flops(shape: ModelShape) -> dict[str, float]:
    """Forward FLOPs per token of one MoE layer: attention, routed experts (top-k SwiGLU MLPs),
    shared experts, router; and `total`."""
    h, nh = shape.hidden, shape.heads
    qk = shape.qk_nope_dim + shape.qk_rope_dim
    q_proj = (h * shape.q_lora + shape.q_lora * nh * qk) if shape.q_lora else h * nh * qk
    kv_proj = h * (shape.kv_lora + shape.qk_rope_dim) \
        + shape.kv_lora * nh * (shape.qk_nope_dim + shape.v_dim)
    out_proj = nh * shape.v_dim * h
    context = shape.seq_len / 2  # causal: mean keys per query
    attention = 2 * (q_proj + kv_proj + out_proj) + 2 * nh * context * (qk + shape.v_dim)
    mlp = 2 * 3 * h * shape.moe_ffn_hidden  # SwiGLU: gate, up, down
    out = {"attention": attention, "routed": shape.topk * mlp,
           "shared": shape.shared_experts * mlp, "router": 2 * h * shape.num_experts}
    out["total"] = sum(out.values())
    return out
