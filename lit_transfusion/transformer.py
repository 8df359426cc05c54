"""Llama-2 decoder block: pre-norm RMSNorm, rotary positions (RoPE), SwiGLU, attention with an optional
key/value prefix (a KV cache) -- the backbone shared by text tokens and image patches.

With ``modalities > 1`` the backbone is a Mixture-of-Transformers (Liang et al. 2024, arXiv 2411.04996): every
block holds one dense block's weights per modality (norms, attention projections, FFN), each position runs
through its own modality's copy, and self-attention itself stays global over the whole sequence. FLOPs per
position are the dense model's; parameters are ``modalities`` times the backbone's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

KV = tuple[Tensor, Tensor]  # keys, values: [B, H, L, Dh] each


@dataclass
class TransformerConfig:
    """Backbone hyper-parameters.

    Attributes:
        dim: model width. n_layers: blocks. n_heads: attention heads (dim % n_heads == 0).
        ffn_hidden: SwiGLU hidden width; None = Llama's 8/3·dim rounded up to a multiple of 64.
        max_seq_len: longest position the RoPE table covers. rope_theta: RoPE base. norm_eps: RMSNorm eps.
        activation_checkpointing: recompute block activations in backward (less memory, ~30 % more compute).
        modalities: 1 = one set of weights for every position (dense). M > 1 = Mixture-of-Transformers: each
            block's norms, Q/K/V and output projections, q/k norms and FFN, and the final norm, exist once per
            modality; ``forward``'s ``modality`` [B, L] picks each position's copy; attention stays global.
        qk_norm: RMSNorm over the head dim on queries and keys before RoPE (Chameleon's remedy for attention
            logits that grow until training diverges); off in Llama-2 and in the Transfusion paper.
    """

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int | None = None
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation_checkpointing: bool = False
    modalities: int = 1
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        if isinstance(self.modalities, bool) or not isinstance(self.modalities, int) or self.modalities < 1:
            raise ValueError(f"modalities={self.modalities!r}: expected an int >= 1 (1 = dense, 2 = "
                             "Mixture-of-Transformers over text and image positions)")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"qk_norm={self.qk_norm!r}: expected True or False")
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.dim / 3 / 64)


def rope_table(head_dim: int, max_len: int, theta: float) -> Tensor:
    """``[max_len, head_dim // 2]`` complex rotations e^{i·pos·freq} for each position and frequency."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate channel pairs. x: [B, H, L, Dh]; rope: [B, L, Dh/2] complex (gathered at each position)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, H, L, Dh/2]
    return torch.view_as_real(pairs * rope[:, None]).flatten(-2).type_as(x)


def attend(qkv: Tensor, rope: Tensor, mask, past: KV | None = None) -> tuple[Tensor, KV]:
    """Self-attention over the whole sequence, without the projections around it.

    qkv: [B, L, 3, H, Dh] queries, keys, values; rope: [B, L, Dh/2]; mask: dense bool [B, 1, L, Lpast+L] or a
    flex BlockMask; past: cached keys/values of earlier positions. Returns the heads' outputs concatenated
    [B, L, H·Dh] and this call's (k, v) [B, H, L, Dh]."""
    B, L = qkv.shape[:2]
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, L, Dh] each
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    new_kv = (k, v)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    if isinstance(mask, Tensor) or mask is None:
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # Under CPU bf16 autocast, attention alone stays fp32: PyTorch's CPU bf16 flash-attention
            # backward is ~2.5x slower than its fp32 one (torch.profiler, tiny config), while matmuls gain ~2x.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).type_as(q)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:  # flex BlockMask (CUDA)
        y = _flex_attention()(q, k, v, block_mask=mask)
    return y.transpose(1, 2).reshape(B, L, -1), new_kv


@functools.cache
def _flex_attention():
    """flex_attention compiled once per process (uncompiled it materializes the full score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # one gain vector over the head dim, shared by the heads
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)

    def qkv(self, x: Tensor) -> Tensor:
        """x [..., D] -> queries, keys, values [..., 3, H, Dh] (q and k RMS-normalised with ``qk_norm``)."""
        qkv = self.wqkv(x).unflatten(-1, (3, self.n_heads, self.head_dim))
        if not self.qk_norm:
            return qkv
        q, k, v = qkv.unbind(-3)
        # The norm in its weight's dtype (float32 under autocast, where the projection gave bf16: a fused kernel and
        # full precision), then back to v's, as the KV cache keeps one dtype.
        dtype = self.q_norm.weight.dtype
        return torch.stack([self.q_norm(q.to(dtype)).to(v.dtype), self.k_norm(k.to(dtype)).to(v.dtype), v], dim=-3)

    def forward(self, x: Tensor, rope: Tensor, mask, past: KV | None = None) -> tuple[Tensor, KV]:
        """x: [B, L, D]; mask: dense bool [B, 1, L, Lpast+L] or a flex BlockMask; past: cached keys/values
        of earlier positions. Returns the output [B, L, D] and this call's (k, v) [B, H, L, Dh]."""
        y, new_kv = attend(self.qkv(x), rope, mask, past)  # [B, L, D]
        return self.wo(y), new_kv


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections fused
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Routing:
    """Which positions of a [B, L] sequence belong to which modality, worked out once per forward and shared
    by every block.

    Positions are grouped by modality with a stable sort, so each modality's weights run on one contiguous
    slice of rows (one gather in, one gather back per routed step) and never on another modality's positions.
    When only one modality is present (a text-only batch, or a KV-cached step over one image's patches) there is
    no gather at all: its weights run on the sequence as it is.

    Args:
        modality: [B, L] long in 0..modalities-1, or None (every position is modality 0).
        modalities: how many modalities the weights exist for.
        shape: (B, L, ...) of the sequence.
    """

    def __init__(self, modality: Tensor | None, modalities: int, shape: Sequence[int]):
        self.shape = tuple(shape[:2])
        n = self.shape[0] * self.shape[1]
        self.order = self.inverse = None
        if modality is None:
            self.counts = [n] + [0] * (modalities - 1)
        else:
            if tuple(modality.shape) != self.shape:
                raise ValueError(f"modality has shape {tuple(modality.shape)}, expected {self.shape} ([B, L])")
            flat = modality.reshape(-1).long()
            valid = (flat >= 0) & (flat < modalities)
            # Out-of-range values are counted in an extra bin: the one host sync reads counts and errors together.
            counts = torch.bincount(torch.where(valid, flat, modalities), minlength=modalities + 1).tolist()
            if counts[-1]:
                raise ValueError(f"modality holds {counts[-1]} value(s) outside 0..{modalities - 1}")
            self.counts = counts[:-1]
        self.present = [m for m, c in enumerate(self.counts) if c] or [0]
        if len(self.present) > 1:
            self.order = flat.argsort(stable=True)  # [B·L] sequence index of each grouped row
            self.inverse = torch.empty_like(self.order)
            self.inverse[self.order] = torch.arange(n, device=flat.device)

    def apply(self, fn: Callable[..., Tensor], *xs: Tensor) -> Tensor:
        """``fn(m, *rows)`` on each present modality ``m``'s positions of ``xs`` (each [B, L, ...]; rows
        [n_m, ...]). Returns the results in sequence order, [B, L, ...]."""
        if self.order is None:
            return fn(self.present[0], *xs)
        grouped = [x.flatten(0, 1).index_select(0, self.order).split(self.counts) for x in xs]
        out = torch.cat([fn(m, *(g[m] for g in grouped)) for m in self.present])  # [B·L, ...] grouped
        return out.index_select(0, self.inverse).unflatten(0, self.shape)

    def unused_zero(self, per_modality: Sequence[nn.Module]) -> Tensor | None:
        """0 · the sum of the parameters of the modalities without a position here (None if every modality has
        one). Added to an output, it gives those parameters a zero gradient instead of none: DDP refuses
        parameters a step did not use, and a text-only batch is an ordinary event with mixed data."""
        unused = [p for m, mod in enumerate(per_modality) if not self.counts[m] for p in mod.parameters()]
        if not unused:
            return None
        return sum(p.sum() for p in unused) * 0.0


class Block(nn.Module):
    """A pre-norm block: x + attn(attn_norm(x)), then x + ffn(ffn_norm(x)).

    Dense (``cfg.modalities == 1``) it holds attn_norm, attn, ffn_norm and ffn. As a Mixture-of-Transformers
    block, ``towers[m]`` holds modality m's copy of those four (a dense block's weights, same names, so one
    tower's state dict is a dense block's) and attention runs once over the positions of every modality.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.modalities = cfg.modalities
        if cfg.modalities > 1:
            dense = dataclasses.replace(cfg, modalities=1)
            self.towers = nn.ModuleList(Block(dense) for _ in range(cfg.modalities))
            return
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, rope: Tensor, mask, past: KV | None = None,
                modality: Tensor | Routing | None = None) -> tuple[Tensor, KV]:
        """x: [B, L, D]; rope: [B, L, Dh/2]; mask and past as :func:`attend`; modality: [B, L] long (None = all
        0), or its :class:`Routing`; a dense block ignores it. Returns [B, L, D] and this call's (k, v)."""
        if self.modalities > 1:
            return self._mixture(x, rope, mask, past, modality)
        a, kv = self.attn(self.attn_norm(x), rope, mask, past)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), kv

    def _mixture(self, x: Tensor, rope: Tensor, mask, past: KV | None,
                 modality: Tensor | Routing | None) -> tuple[Tensor, KV]:
        route = modality if isinstance(modality, Routing) else Routing(modality, self.modalities, x.shape)
        towers = self.towers

        def project(m: int, h: Tensor) -> Tensor:  # [n, D] -> [n, 3, H, Dh]
            return towers[m].attn.qkv(towers[m].attn_norm(h))

        def residual(m: int, h: Tensor, y: Tensor) -> Tensor:  # [n, D], [n, D] -> [n, D]
            h = h + towers[m].attn.wo(y)
            return h + towers[m].ffn(towers[m].ffn_norm(h))

        qkv = route.apply(project, x)  # [B, L, 3, H, Dh]
        y, kv = attend(qkv, rope, mask, past)  # [B, L, D]: global, every modality's keys in one softmax
        x = route.apply(residual, x, y)  # [B, L, D]
        zero = route.unused_zero(towers)
        return (x if zero is None else x + zero), kv


class Transformer(nn.Module):
    """Stack of blocks + final RMSNorm (one per modality) over already-embedded inputs."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.modalities == 1:
            self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        else:
            self.norms = nn.ModuleList(nn.RMSNorm(cfg.dim, eps=cfg.norm_eps) for _ in range(cfg.modalities))
        # Not persistent: derived from the config, so checkpoints stay small and size-independent.
        self.register_buffer("rope", self._rope_table(), persistent=False)

    def _rope_table(self) -> Tensor:
        return rope_table(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta)

    def reset_buffers(self) -> None:
        """Recompute the RoPE table in place (after ``to_empty`` from the meta device)."""
        self.rope.copy_(self._rope_table().to(self.rope.device))

    def forward(
        self, x: Tensor, positions: Tensor, mask, past: list[KV] | None = None, modality: Tensor | None = None
    ) -> tuple[Tensor, list[KV]]:
        """x: [B, L, D] embeddings; positions: [B, L] RoPE positions; past: per-layer cached (k, v); modality:
        [B, L] long, each position's modality (None = all 0; a dense model ignores it).
        Returns normalized hidden states [B, L, D] and per-layer (k, v) of these L positions."""
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is past the model's max_seq_len={self.cfg.max_seq_len}"
            )
        rope = self.rope[positions]  # [B, L, Dh/2] complex
        route = None if self.cfg.modalities == 1 else Routing(modality, self.cfg.modalities, x.shape)
        new_kv: list[KV] = []
        for i, block in enumerate(self.blocks):
            layer_past = None if past is None else past[i]
            if self.cfg.activation_checkpointing and self.training:
                x, kv = checkpoint(block, x, rope, mask, layer_past, route, use_reentrant=False)
            else:
                x, kv = block(x, rope, mask, layer_past, route)
            new_kv.append(kv)
        if route is None:
            return self.norm(x), new_kv
        x = route.apply(lambda m, h: self.norms[m](h), x)
        zero = route.unused_zero(self.norms)
        return (x if zero is None else x + zero), new_kv
