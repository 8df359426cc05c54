"""Llama-2 decoder block: pre-norm RMSNorm, rotary positions (RoPE), SwiGLU, attention with an optional
key/value prefix (a KV cache) -- the backbone shared by text tokens and image patches."""

from __future__ import annotations

import functools
import math
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
    """

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int | None = None
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
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


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, mask, past: KV | None = None) -> tuple[Tensor, KV]:
        """x: [B, L, D]; mask: dense bool [B, 1, L, Lpast+L] or a flex BlockMask; past: cached keys/values
        of earlier positions. Returns the output [B, L, D] and this call's (k, v) [B, H, L, Dh]."""
        B, L, D = x.shape
        q, k, v = self.wqkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # [B, H, L, Dh]
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
        return self.wo(y.transpose(1, 2).reshape(B, L, D)), new_kv


@functools.cache
def _flex_attention():
    """flex_attention compiled once per process (uncompiled it materializes the full score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections fused
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, rope: Tensor, mask, past: KV | None = None) -> tuple[Tensor, KV]:
        a, kv = self.attn(self.attn_norm(x), rope, mask, past)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), kv


class Transformer(nn.Module):
    """Stack of blocks + final RMSNorm over already-embedded inputs."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        # Not persistent: derived from the config, so checkpoints stay small and size-independent.
        self.register_buffer("rope", self._rope_table(), persistent=False)

    def _rope_table(self) -> Tensor:
        return rope_table(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta)

    def reset_buffers(self) -> None:
        """Recompute the RoPE table in place (after ``to_empty`` from the meta device)."""
        self.rope.copy_(self._rope_table().to(self.rope.device))

    def forward(
        self, x: Tensor, positions: Tensor, mask, past: list[KV] | None = None
    ) -> tuple[Tensor, list[KV]]:
        """x: [B, L, D] embeddings; positions: [B, L] RoPE positions; past: per-layer cached (k, v).
        Returns normalized hidden states [B, L, D] and per-layer (k, v) of these L positions."""
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is past the model's max_seq_len={self.cfg.max_seq_len}"
            )
        rope = self.rope[positions]  # [B, L, Dh/2] complex
        new_kv: list[KV] = []
        for i, block in enumerate(self.blocks):
            layer_past = None if past is None else past[i]
            if self.cfg.activation_checkpointing and self.training:
                x, kv = checkpoint(block, x, rope, mask, layer_past, use_reentrant=False)
            else:
                x, kv = block(x, rope, mask, layer_past)
            new_kv.append(kv)
        return self.norm(x), new_kv
