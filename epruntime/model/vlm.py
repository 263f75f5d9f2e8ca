"""The MoE vision-language model: image patches and question tokens through a megatron-core
GPTModel whose every MLP is an MoELayer.

    images [B, 3, H, W] -> patches [B, P, 3*p*p] -> PatchProjector -> vision tokens [B, P, D]
    question_ids [B, L]  -> GPTModel word + position embedding     -> text tokens   [B, L, D]
    sequence [S = P + L, B, D]  (vision first, then the question; causal attention)
      -> GPTModel decoder (attention + MoE per layer) -> output layer
      -> logits at the question's last token, restricted to the answer tokens -> [B, A]

The answer is a token of the language model's vocabulary (ids `answer_offset + a`), so the model
is an ordinary causal LM trained on one target position, as VLMs fine-tuned on VQA are.
"""

from __future__ import annotations

import hashlib

import torch
from megatron.core.models.gpt import GPTModel
from torch import nn

from epruntime.config import Config
from epruntime.model.context import TEXT, VISION, token_context
from epruntime.model.sharding import to_global_name
from epruntime.placement import Placement, PlacementError
from epruntime.model.spec import moe_layer_spec, transformer_config
from epruntime.smoes.router import build_router

IMAGE_ID = 2  # placeholder token id at vision positions (epruntime.data.Vocab.IMAGE_ID)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], patches in row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


class PatchProjector(nn.Module):
    """Patches -> vision tokens: LayerNorm then a two-layer MLP, as LLaVA's projector."""

    def __init__(self, patch: int, channels: int, hidden: int):
        super().__init__()
        self.patch = patch
        dim = channels * patch * patch
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, P, D]."""
        x = self.norm(patchify(images, self.patch))
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class MoEVLM(nn.Module):
    def __init__(
        self,
        cfg: Config,
        text_vocab_size: int,
        num_answers: int,
        max_question_len: int,
        router_cls: type | None = None,
        dispatcher_cls: type | None = None,
        ranks_per_node: int | None = None,
    ):
        super().__init__()
        m = cfg.model
        self.num_vision_tokens = m.num_vision_tokens
        self.max_question_len = max_question_len
        self.answer_offset = text_vocab_size
        self.num_answers = num_answers
        self.image_size = m.image_size
        self.text_vocab_size = text_vocab_size
        self.vision = PatchProjector(m.patch_size, 3, m.hidden_size)
        attention_modality = None
        if router_cls is None:
            router_cls, attention_modality = build_router(cfg)
        self.gpt = GPTModel(
            config=transformer_config(cfg),
            transformer_layer_spec=moe_layer_spec(cfg, router=router_cls, dispatcher=dispatcher_cls),
            vocab_size=text_vocab_size + num_answers,
            max_sequence_length=self.num_vision_tokens + max_question_len,
            position_embedding_type="learned_absolute",
            share_embeddings_and_output_weights=False,
        )
        self.placements = [Placement.contiguous(m.num_experts, cfg.parallel.ep_size,
                                                ranks_per_node)] * m.num_layers
        self.set_placements(self.placements)
        if attention_modality is not None:
            attention_modality.attach(self.gpt.decoder.layers)

    @property
    def seq_len(self) -> int:
        return self.num_vision_tokens + self.max_question_len

    def modality(self, batch_size: int) -> torch.Tensor:
        """[S, B] int64: VISION for the image positions, TEXT for the question."""
        p, q = self.num_vision_tokens, self.max_question_len
        col = torch.cat([torch.full((p,), VISION), torch.full((q,), TEXT)])
        return col[:, None].expand(p + q, batch_size)

    def forward(
        self, images: torch.Tensor, question_ids: torch.Tensor, question_lens: torch.Tensor
    ) -> torch.Tensor:
        """images [B, 3, H, W] float, question_ids [B, L] int64, question_lens [B] -> [B, A]."""
        b, p = images.shape[0], self.num_vision_tokens
        image_ids = torch.full((b, p), IMAGE_ID, dtype=question_ids.dtype)
        input_ids = torch.cat([image_ids, question_ids], dim=1)
        position_ids = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        embedded_SBD = self.gpt.embedding(input_ids=input_ids, position_ids=position_ids)
        vision_PBD = self.vision(images).transpose(0, 1)
        embedded_SBD = torch.cat([embedded_SBD[:p] + vision_PBD, embedded_SBD[p:]], dim=0)
        with token_context(self.modality(b)):
            logits_BSV = self.gpt(
                input_ids=None, position_ids=None, attention_mask=None, decoder_input=embedded_SBD
            )
        last = p + question_lens - 1
        logits_BV = logits_BSV[torch.arange(b), last]
        return logits_BV[:, self.answer_offset :]

    @property
    def moe_layers(self) -> list:
        return [layer.mlp for layer in self.gpt.decoder.layers]

    def set_placements(self, placements: list[Placement]) -> None:
        """Record where each layer's logical experts live (and tell dispatchers that route by
        it). Does not move weights: see `epruntime.placement.migrate` for that."""
        if len(placements) != len(self.placements):
            raise PlacementError(f"{len(placements)} placements for {len(self.placements)} MoE layers")
        for layer, (old, new) in enumerate(zip(self.placements, placements)):
            if (new.num_experts, new.num_ranks) != (old.num_experts, old.num_ranks):
                raise PlacementError(f"layer {layer}: placement for {new.num_experts} experts on "
                                     f"{new.num_ranks} ranks, model has {old.num_experts} on "
                                     f"{old.num_ranks}")
        self.placements = list(placements)
        for moe, placement in zip(self.moe_layers, placements):
            set_placement = getattr(moe.token_dispatcher, "set_placement", None)
            if set_placement is not None:
                set_placement(placement)
            elif not placement.is_contiguous:
                raise PlacementError(f"{type(moe.token_dispatcher).__name__} only supports "
                                     "megatron-core's contiguous placement; use dispatch.kind=dedup")

    def global_named_parameters(self, ep_rank: int):
        """(global name, parameter) pairs: expert slots named by logical expert (model.sharding)."""
        for name, param in self.named_parameters():
            yield to_global_name(name, ep_rank, self.placements), param

    def global_named_buffers(self, ep_rank: int):
        """(global name, buffer) of the persistent buffers: router state such as SMoES's EMA
        counts, bins and Gaussian statistics, which checkpoints must carry too."""
        params = {name for name, _ in self.named_parameters()}
        for name, value in self.state_dict(keep_vars=True).items():
            if name not in params and isinstance(value, torch.Tensor):
                yield to_global_name(name, ep_rank, self.placements), value


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


@torch.no_grad()
def init_weights_(
    model: MoEVLM, seed: int, std: float, num_layers: int, ep_rank: int
) -> None:
    """Initialise every parameter from a generator seeded by (seed, global name).

    A parameter's initial value depends only on the seed and what it is, never on which rank holds
    it, so the same seed gives the same model at any EP size. Norm weights 1, biases 0, matrices
    N(0, std), output projections of each block N(0, std / sqrt(2 * num_layers)) as in
    megatron-core's scaled init.
    """
    for name, param in model.global_named_parameters(ep_rank):
        gen = torch.Generator().manual_seed(_seed_for(seed, name))
        if param.dim() == 1:
            param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            continue
        scaled = name.endswith(("linear_proj.weight", "linear_fc2.weight"))
        sigma = std / (2 * num_layers) ** 0.5 if scaled else std
        param.copy_(torch.randn(param.shape, generator=gen) * sigma)
