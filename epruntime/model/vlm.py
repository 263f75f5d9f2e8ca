"""The MoE vision-language model: image patches and question tokens through a megatron-core
GPTModel whose every MLP is an MoELayer.

    images [B, 3, H, W] -> VisionTower (encoder + projector, model.vision) -> vision tokens [B, P, D]
    question_ids [B, L]  -> GPTModel word + position embedding     -> text tokens   [B, L, D]
    sequence [S = P + L, B, D]  (vision first, then the question; causal attention)
      -> GPTModel decoder (attention + MoE per layer) -> output layer
      -> logits at the question's last token, restricted to the answer tokens -> [B, A]

The answer is a token of the language model's vocabulary (ids `answer_offset + a`), so the model
is an ordinary causal LM trained on one target position, as VLMs fine-tuned on VQA are.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.router import TopKRouter
from torch import nn

from epruntime.compress import build_compressor, reducer_config
from epruntime.config import Config
from epruntime.fastmmoe import FlopCounter, TokenReducer, TokenState
from epruntime.modality import TEXT, VISION
from epruntime.modes import ExpertSkipper
from epruntime.modes.calibration import skipper_settings
from epruntime.model.placement_support import PlacementAware, unsupported_reason
from epruntime.model.router_tap import RouterTap
from epruntime.model.routing_hooks import hooked_router
from epruntime.model.sharding import to_global_name
from epruntime.placement import Placement, PlacementError
from epruntime.placement.groups import group_violation
from epruntime.model.spec import decoder_block_spec, transformer_config
from epruntime.model.vision import VisionTower
from epruntime.runtime import LayerRuntime, layer_runtimes
from epruntime.smoes.router import build_router

IMAGE_ID = 2  # placeholder token id at vision positions (epruntime.data.Vocab.IMAGE_ID)


class InputError(ValueError):
    """A batch the model cannot take; the message names the tensor, what it got and what the
    model expects. Raised before any collective, so no rank is left waiting on a bad shape."""


def _describe(name: str, t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"{name} is a {type(t).__name__}, not a tensor"
    return f"{name} has shape {tuple(t.shape)} dtype {t.dtype}"


def _check_ints(name: str, t, dims: int, expected: str) -> None:
    if (not isinstance(t, torch.Tensor) or t.dim() != dims or t.is_floating_point()
            or t.is_complex() or t.dtype == torch.bool):
        raise InputError(f"{_describe(name, t)}; expected {expected}")


def _check_range(name: str, t: torch.Tensor, low: int, high: int, what: str) -> None:
    """Every value of `t` in [low, high); one min/max pass, details only on failure."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        bad = ((t < low) | (t >= high)).nonzero()[0].tolist()
        raise InputError(f"{name} holds {what} outside [{low}, {high}): min {lo}, max {hi} "
                         f"(first at index {tuple(bad)}, value {int(t[tuple(bad)])})")


def check_batch(images, question_ids, question_lens, *, image_size: int, channels: int,
                image_dtype: torch.dtype, text_vocab_size: int, max_question_len: int,
                answers=None, num_answers: int | None = None) -> None:
    """Validate one batch at the model boundary: shapes, dtypes, batch sizes, token and label
    ranges, question lengths, finite pixels. Cheap (a min/max or isfinite pass per tensor), so
    it is always on. Raises InputError."""
    c, s = channels, image_size
    if (not isinstance(images, torch.Tensor) or images.dim() != 4
            or tuple(images.shape[1:]) != (c, s, s)):
        raise InputError(f"{_describe('images', images)}; expected [B, {c}, {s}, {s}] "
                         f"(model.image_size={s}, {c} channels)")
    if images.dtype != image_dtype:
        raise InputError(f"{_describe('images', images)}; expected dtype {image_dtype} "
                         "(the model's)")
    b, q = images.shape[0], max_question_len
    _check_ints("question_ids", question_ids, 2, f"[B, {q}] integer token ids")
    _check_ints("question_lens", question_lens, 1, "[B] integer lengths")
    sizes = {"images": b, "question_ids": question_ids.shape[0],
             "question_lens": question_lens.shape[0]}
    if answers is not None:
        _check_ints("answers", answers, 1, "[B] integer answer labels")
        sizes["answers"] = answers.shape[0]
    if len(set(sizes.values())) > 1:
        raise InputError("batch size differs between tensors: "
                         + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    if question_ids.shape[1] != q:
        raise InputError(f"{_describe('question_ids', question_ids)}; expected [B, {q}] "
                         f"(questions padded to max_question_len={q})")
    _check_range("question_ids", question_ids, 0, text_vocab_size,
                 f"token ids (text vocabulary size {text_vocab_size})")
    if question_lens.numel():
        lo, hi = int(question_lens.min()), int(question_lens.max())
        if lo < 1:
            row = int((question_lens < 1).nonzero()[0])
            raise InputError(f"question_lens[{row}] = {int(question_lens[row])}: empty question "
                             "(every question needs at least 1 token)")
        if hi > q:
            row = int((question_lens > q).nonzero()[0])
            raise InputError(f"question_lens[{row}] = {int(question_lens[row])} exceeds "
                             f"max_question_len={q}")
    if not bool(torch.isfinite(images).all()):
        bad = (~torch.isfinite(images)).nonzero()[0].tolist()
        raise InputError(f"images hold non-finite values (NaN or inf), first at index "
                         f"{tuple(bad)}: {images[tuple(bad)].item()}")
    if answers is not None:
        if num_answers is None:
            raise TypeError("check_batch: answers given without num_answers")
        _check_range("answers", answers, 0, num_answers, f"labels ({num_answers} answers)")


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
        runtimes: list[LayerRuntime] | None = None,
        placements: list[Placement] | None = None,
    ):
        """`placements`: one per MoE layer to build with (default contiguous); a replicated
        one sizes the layer's expert slots (`Placement.num_local`), which stay fixed after:
        migration moves experts and copies between those slots."""
        super().__init__()
        m = cfg.model
        self.num_vision_tokens = m.num_vision_tokens
        self.max_question_len = max_question_len
        self.answer_offset = text_vocab_size
        self.num_answers = num_answers
        self.image_size = m.image_size
        self.debug_checks = cfg.debug_checks  # validate batches in forward (host syncs)
        self.text_vocab_size = text_vocab_size
        self.vision = VisionTower(m, channels=3)
        # One runtime per MoE layer (Engine: transport, kernels, observers); all share the token
        # stream this model writes as its forward pass goes from layer to layer.
        runtimes = runtimes or layer_runtimes(m.num_moe_layers)
        self.tokens = runtimes[0].tokens
        attention_modality = None
        if router_cls is None:
            router_cls, attention_modality = build_router(cfg, self.tokens)
        # FastMMoE-style reduction at inference (off unless fastmmoe.enabled) and FLOPs counting;
        # the routers hand it their routing (a routing hook on whichever router is used).
        flops = FlopCounter(hidden=m.hidden_size, num_layers=m.num_layers,
                            num_experts=m.num_experts, topk=m.moe_topk,
                            ffn=m.moe_ffn_hidden_size, vocab=text_vocab_size + num_answers,
                            patch_dim=self.vision.encoder.out_dim,  # projector input width
                            moe_pattern=m.moe_layer_pattern, dense_ffn=4 * m.hidden_size,
                            shared_ffn=m.moe_shared_expert_intermediate_size or 0)
        # Learned visual-token compression after the projector (learnpruner / qmop; None: off),
        # trained with the model; LearnPruner's stage 2 is the reducer's text2vision policy.
        self.compressor = build_compressor(cfg)
        self.reducer = TokenReducer(reducer_config(cfg), m.moe_topk, m.num_layers, self.tokens,
                                    flops, attention_modality, kernels=runtimes[0].kernels)
        # MoDES expert skipping at inference (off unless modes.enabled; alpha and thresholds
        # from the modes.calibration file, or the thresholds given): the routers hand it their
        # routing first, so FastMMoE, the FLOPs and the dispatchers see what is left.
        self.skipper = ExpertSkipper(cfg.modes, m.num_layers, self.tokens,
                                     *skipper_settings(cfg.modes, m))
        router_cls = hooked_router(router_cls or TopKRouter, self.skipper.adjust_routing,
                                   self.reducer.adjust_routing)
        initial = placements or [Placement.contiguous(m.num_experts, cfg.parallel.ep_size,
                                                      ranks_per_node)] * m.num_moe_layers
        num_local = [p.num_local if p.is_replicated else None for p in initial]
        self.gpt = GPTModel(
            config=transformer_config(cfg),
            transformer_layer_spec=decoder_block_spec(cfg, router_cls, dispatcher_cls, runtimes,
                                                      num_local),
            vocab_size=text_vocab_size + num_answers,
            max_sequence_length=self.num_vision_tokens + max_question_len,
            position_embedding_type="learned_absolute",
            share_embeddings_and_output_weights=False,
        )
        # group-limited routing: placements must keep each router group on its rank / node
        self.router_groups = m.moe_router_num_groups
        # Decoder-layer index of each MoE layer (dense layers among them: model.moe_layer_freq);
        # placements, runtimes and `moe_layers` are indexed by position in this list.
        self.moe_layer_indices = m.moe_layer_indices
        self.placements = list(initial)
        self.set_placements(self.placements)
        if attention_modality is not None:
            attention_modality.attach(self.gpt.decoder.layers, m.moe_layer_pattern)
        self.reducer.attach(self.gpt.decoder.layers)
        # On the hooked routers' output: observers see the routing that was dispatched.
        self.router_tap = RouterTap([moe.router for moe in self.moe_layers], self.tokens)

    @property
    def seq_len(self) -> int:
        return self.num_vision_tokens + self.max_question_len

    def modality(self, batch_size: int, device: torch.device | str = "cpu",
                 num_vision: int | None = None) -> torch.Tensor:
        """[S, B] int64 on `device`: VISION for the `num_vision` (default: all) image
        positions, TEXT for the question."""
        p, q = num_vision or self.num_vision_tokens, self.max_question_len
        col = torch.cat([torch.full((p,), VISION, device=device),
                         torch.full((q,), TEXT, device=device)])
        return col[:, None].expand(p + q, batch_size)

    def check_batch(self, images, question_ids, question_lens, answers=None) -> None:
        """InputError unless the tensors fit this model (and `answers` its labels)."""
        check_batch(images, question_ids, question_lens, image_size=self.image_size,
                    channels=self.vision.channels, image_dtype=self.vision.dtype,
                    text_vocab_size=self.text_vocab_size, max_question_len=self.max_question_len,
                    answers=answers, num_answers=self.num_answers)

    def embed(self, images: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
        """Decoder input [S, B, D]: vision tokens plus position embeddings, then the
        question's token and position embeddings."""
        b, p = images.shape[0], self.num_vision_tokens
        image_ids = torch.full((b, p), IMAGE_ID, dtype=question_ids.dtype,
                               device=question_ids.device)
        input_ids = torch.cat([image_ids, question_ids], dim=1)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        position_ids = position_ids.expand_as(input_ids)
        embedded_SBD = self.gpt.embedding(input_ids=input_ids, position_ids=position_ids)
        vision_PBD = self.vision(images).transpose(0, 1)
        return torch.cat([embedded_SBD[:p] + vision_PBD, embedded_SBD[p:]], dim=0)

    def forward(
        self, images: torch.Tensor, question_ids: torch.Tensor, question_lens: torch.Tensor,
        *, check: bool | None = None,
    ) -> torch.Tensor:
        """images [B, 3, H, W] float, question_ids [B, L] int64, question_lens [B] -> [B, A].
        The batch is validated first (InputError) when `check`, by default `debug_checks`."""
        if self.debug_checks if check is None else check:
            self.check_batch(images, question_ids, question_lens)
        b, p = images.shape[0], self.num_vision_tokens
        input_SBD = self.embed(images, question_ids)
        vision_KBD, module_flops = self.compress(input_SBD[:p], input_SBD[p:], question_lens)
        k = vision_KBD.shape[0]  # visual tokens the decoder sees
        if self.compressor is not None:  # (at k = p too: the scorer still learns)
            input_SBD = torch.cat([vision_KBD, input_SBD[p:]], dim=0)
        state = TokenState(input_SBD, self.modality(b, images.device, k), k)
        self.reducer.begin(self.training, question_lens, k, k + self.max_question_len,
                           full_vision=p, module_flops=module_flops)
        try:
            with self.tokens.forward(state.modality_SB):
                logits_SBV, state = self.decode(state)
        except BaseException:
            self.reducer.abort()
            raise
        self.reducer.end(b, logits_SBV.shape[0])
        last = state.num_vision + question_lens - 1  # visual tokens left after any pruning
        logits_BV = logits_SBV[last, torch.arange(b, device=last.device)]
        return logits_BV[:, self.answer_offset :]

    def compress(self, vision_PBD: torch.Tensor, text_LBD: torch.Tensor,
                 question_lens: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The learned compressor (epruntime.compress) on the visual rows of the decoder input:
        [P, B, D] -> ([K, B, D], its analytic FLOPs for this batch); unchanged when off."""
        if self.compressor is None:
            return vision_PBD, 0.0
        q = text_LBD.shape[0]
        valid_BL = torch.arange(q, device=question_lens.device)[None] < question_lens[:, None]
        out = self.compressor(vision_PBD, text_LBD, valid_BL)
        return out.vision_KBD, self.compressor.flops(vision_PBD.shape[1])

    def decode(self, state: TokenState) -> tuple[torch.Tensor, TokenState]:
        """megatron-core's decoder layers one by one on an explicit token state, the token
        reducer between them (it may shorten the sequence), then the final norm and the output
        layer: logits [S', B, V] and the state that reached them. The same computation as
        GPTModel's decoder for this model (learned absolute positions, no mask, no rotary)."""
        for index, layer in enumerate(self.gpt.decoder.layers):
            self.tokens.enter(state.modality_SB)  # what the routers and dispatchers read
            self.reducer.before_layer(index, state.modality_SB)
            hidden_SBH, _ = layer(hidden_states=state.hidden_SBH, attention_mask=None)
            state = self.reducer.after_layer(index, dataclasses.replace(state,
                                                                        hidden_SBH=hidden_SBH))
        hidden_SBH = self.gpt.decoder.final_layernorm(state.hidden_SBH)
        logits_SBV, _ = self.gpt.output_layer(hidden_SBH)
        return logits_SBV, state

    @property
    def moe_layers(self) -> list:
        """The MoE MLPs, in layer order (dense layers left out)."""
        layers = self.gpt.decoder.layers
        return [layers[i].mlp for i in self.moe_layer_indices]

    def placement_of_layer(self) -> dict[int, Placement]:
        """Decoder-layer index -> its placement (MoE layers only): what parameter names, which
        carry the decoder-layer index, are mapped by (epruntime.model.sharding)."""
        return dict(zip(self.moe_layer_indices, self.placements))

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
        reason = self.unsupported_placements(placements)
        if reason is not None:
            raise PlacementError(reason)
        self.placements = list(placements)
        for moe, placement in zip(self.moe_layers, placements):
            if isinstance(moe.token_dispatcher, PlacementAware):
                moe.token_dispatcher.set_placement(placement)

    def unsupported_placements(self, placements: list[Placement]) -> str | None:
        """Why this model's dispatchers cannot route `placements`, or why they would split a
        group of group-limited routing (None when they can route them)."""
        reason = unsupported_reason([moe.token_dispatcher for moe in self.moe_layers], placements)
        if reason is None and self.router_groups is not None:
            for layer, placement in enumerate(placements):
                if (split := group_violation(placement, self.router_groups)) is not None:
                    return f"layer {layer}: {split}"
        return reason

    def global_named_parameters(self, ep_rank: int):
        """(global name, parameter) pairs: expert slots named by logical expert (model.sharding)."""
        placements = self.placement_of_layer()
        for name, param in self.named_parameters():
            yield to_global_name(name, ep_rank, placements), param

    def global_named_buffers(self, ep_rank: int):
        """(global name, buffer) of the persistent buffers: router state such as SMoES's EMA
        counts, bins and Gaussian statistics, which checkpoints must carry too."""
        params = {name for name, _ in self.named_parameters()}
        placements = self.placement_of_layer()
        for name, value in self.state_dict(keep_vars=True).items():
            if name not in params and isinstance(value, torch.Tensor):
                yield to_global_name(name, ep_rank, placements), value


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
    megatron-core's scaled init. Convolution kernels (the vision encoder's stem, each followed
    by a GELU) get He's N(0, 2 / fan_in) instead, as convolutional stems are initialised.
    """
    for name, param in model.global_named_parameters(ep_rank):
        gen = torch.Generator().manual_seed(_seed_for(seed, name))
        if param.dim() == 1:
            param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            continue
        if param.dim() == 4:  # conv kernel [out, in, kh, kw]
            fan_in = param[0].numel()
            param.copy_(torch.randn(param.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            continue
        scaled = name.endswith(("linear_proj.weight", "linear_fc2.weight"))
        sigma = std / (2 * num_layers) ** 0.5 if scaled else std
        param.copy_(torch.randn(param.shape, generator=gen) * sigma)
