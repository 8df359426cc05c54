"""Generation from a TransfusionModel: KV-cached text decoding, prefix-cached image denoising with
classifier-free guidance, mixed text -> image -> text output, and captioning.

One sequence state per batch row: the positions written so far as a ``Seq`` (the same type training packs),
the images so far, and a per-layer KV cache of everything already written. Every forward goes through
:meth:`_run`, which
either attends the new positions against the cache (fast path) or recomputes the whole sequence
(``use_cache=False``, the reference the tests compare against).

Rows are left-padded so every row's newest position is the last column; pads form their own "document"
(doc id -1), which the mask keeps invisible to real positions.

Image generation (the paper's sec. 3): on ``<boi>``, N noise patches are appended and denoised with
a fresh diffusers scheduler (``Diffusion.sample``: the objective's); each step runs ONLY the patch positions
against the cached prefix, all of them in one forward under the model's image-attention rule (their
keys/values are not written: they change every step). After the last step the clean latent is run once at
t = 0 and written to the cache, ``<eoi>`` is appended, and decoding continues in text mode.
Guidance runs cond and uncond rows in one batch; the uncond row is ``<bos> <boi>``: the null caption, exactly
as training's caption-dropped documents lay it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lit_transfusion.attention import hybrid_mask
from lit_transfusion.batch import Image, Seq, SpecialIds, Text, document_length, pack_rows
from lit_transfusion.diffusion import SAMPLERS, Diffusion
from lit_transfusion.model import TransfusionModel


@dataclass
class SamplingConfig:
    """How to sample.

    Attributes:
        max_new_tokens: text tokens to generate at most (per text phase).
        min_new_tokens: ``<eos>`` cannot be sampled before this many tokens (per text phase).
        temperature: 0 = greedy.
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus mass (1 = all).
        scheduler: the diffusers sampler: ddpm, ddim or dpm++ (DPM-Solver++ 2M), in the model's prediction mode
            (ε or v). A model trained with ``objective: flow`` is always sampled with diffusers'
            FlowMatchEulerDiscreteScheduler (rectified-flow Euler, shift 1), whatever this says.
        steps: denoising steps (paper: 250 DDPM).
        guidance_scale: classifier-free guidance s (1 = no guidance, conditional only).
        guidance_interval: (lo, hi) training timesteps; guidance applies at the denoising steps with
            lo <= t < hi (flow: t = σ·T, on the same 0..1000 scale) and the conditional prediction alone
            elsewhere (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"). Default (0, 1000):
            every step, the paper's sampler.
        image_temperature: temperature of image-code sampling (discrete-token models, ``ChameleonSampler``;
            Chameleon samples its image tokens at 1; 0 = greedy). Guidance applies to the logits first.
        image_top_k: keep the k most likely image codes (0 = all); discrete-token models only.
        seed: makes noise and token sampling reproducible.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    scheduler: Literal["ddpm", "ddim", "dpm++"] = "ddpm"
    steps: int = 250
    guidance_scale: float = 3.0
    guidance_interval: tuple[int, int] = (0, 1000)
    image_temperature: float = 1.0
    image_top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheduler not in SAMPLERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: expected >= 1")
        if min(self.max_new_tokens, self.min_new_tokens, self.top_k, self.image_top_k) < 0:
            raise ValueError("max_new_tokens, min_new_tokens, top_k and image_top_k must be >= 0")
        if min(self.guidance_scale, self.temperature, self.image_temperature) < 0 or not 0 < self.top_p <= 1:
            raise ValueError("guidance_scale, temperature and image_temperature must be >= 0 and top_p in (0, 1]")
        lo, hi = self.guidance_interval
        if not 0 <= lo < hi:
            raise ValueError(f"guidance_interval={self.guidance_interval}: expected 0 <= lo < hi (timesteps)")


@dataclass
class State:
    """Sequences of B rows so far (left-padded: pads have doc id -1, real positions doc id 0)."""

    seq: Seq  # [B, L] fields
    latents: Tensor  # [N, C, h, w] clean latents of images already in the sequences
    kv: list | None = None  # per-layer (k, v) [B, H, L, Dh] of every position, or None (no cache)
    images: list = field(default_factory=list)  # per row: list of generated latents
    hidden: Tensor | None = None  # [B, D] hidden state at each row's last position (its next-token logits)

    @property
    def next_pos(self) -> Tensor:
        """[B] RoPE position of each row's next token."""
        return self.seq.positions[:, -1] + 1

    @property
    def rows(self) -> int:
        return int(self.seq.tokens.shape[0])


class TransfusionSampler:
    """Samples text and images from a model. ``use_cache=False`` recomputes everything at every step.

    Args:
        model: a TransfusionModel (put in eval mode here).
        diffusion: the training Diffusion (its objective picks the sampling scheduler and what the model predicts).
        special: special token ids.
    """

    def __init__(self, model: TransfusionModel, diffusion: Diffusion, special: SpecialIds, use_cache: bool = True):
        self.model, self.diffusion, self.special, self.use_cache = model.eval(), diffusion, special, use_cache
        self.attention = "auto"  # the mask's rendering (attention.hybrid_mask); module.sampler() sets the module's
        self.cfg = model.cfg
        self.max_len = model.cfg.transformer.max_seq_len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------ sequence state
    def start(self, prompts: list[list]) -> tuple[State, Tensor]:
        """Prefill B prompts (each a list of Text / Image segments; images are fed clean, t = 0).
        Returns the state and the hidden state of each row's last position [B, D]."""
        docs = [[seg if isinstance(seg, (Text, Image)) else Text(list(seg)) for seg in p] for p in prompts]
        lens = [document_length(d, self.cfg.patches_per_image) for d in docs]
        L = max(lens)
        self._check_room(L)
        b = pack_rows([[d] for d in docs], L, self.cfg.patch_size, self.special).to(self.device)
        # Left-pad: roll each row so its last real position sits in the last column.
        shift = torch.tensor([L - n for n in lens], device=self.device)
        idx = (torch.arange(L, device=self.device)[None] - shift[:, None]) % L
        latents = b.latents if b.num_images else torch.zeros((0, *self.cfg.latent_shape), device=self.device)
        state = State(seq=b.seq.map(lambda _, x: x.gather(1, idx)), latents=latents, images=[[] for _ in docs])
        hidden, _ = self._run(state, state.seq, append=True)  # prefill; prompt images at t = 0
        return state, hidden[:, -1]

    def _check_room(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(
                f"the sequence would reach {length} positions, past the model's max_seq_len={self.max_len}: "
                "shorten the prompt or lower max_new_tokens"
            )

    def _extend(self, state: State, tokens: Tensor, image_ids: Tensor, patch_ids: Tensor) -> Seq:
        """The new positions [B, n] after each row's last one (same document, positions continuing)."""
        n = tokens.shape[1]
        self._check_room(int(state.next_pos.max()) + n)
        return Seq(
            tokens=tokens,
            positions=state.next_pos[:, None] + torch.arange(n, device=self.device),
            doc_ids=torch.zeros_like(tokens),
            image_ids=image_ids,
            patch_ids=patch_ids,
        )

    @torch.no_grad()
    def _run(self, state: State, new: Seq, append: bool, latents: Tensor | None = None, t: Tensor | None = None):
        """Forward the positions ``new`` after those of ``state``.

        If ``new is state.seq`` this is a prefill of the whole state. ``latents``/``t``: [N, C, h, w] / [N] for
        ALL images referenced by ``state`` and ``new`` (default: the state's clean latents at t = 0).
        Returns (hidden [B, n, D], eps [N, C, h, w]); with ``append`` the new positions join the state.
        """
        prefill = new is state.seq
        if latents is None:
            latents = state.latents
            t = torch.zeros(latents.shape[0], dtype=torch.long, device=self.device)
        n = new.tokens.shape[1]
        rule = self.cfg.image_attention  # the mask the model was trained with
        # "auto" is SDPA here even on CUDA: every decoding step has a new length, and the compiled flex kernel
        # would recompile for each one. An explicit "flex" is honoured.
        attention = "sdpa" if self.attention == "auto" else self.attention
        if prefill or not self.use_cache:
            full = state.seq if prefill else state.seq.cat(new)
            mask = hybrid_mask(full.doc_ids, full.image_ids, image_attention=rule, attention=attention)
            out = self.model(full, latents, t, mask)
            hidden, kv = out.hidden[:, -n:], [(k[:, :, -n:], v[:, :, -n:]) for k, v in out.kv]
        else:
            keys = state.seq.cat(new)
            mask = hybrid_mask(keys.doc_ids, keys.image_ids, n, image_attention=rule, attention=attention)
            out = self.model(new, latents, t, mask, past=state.kv)
            hidden, kv = out.hidden, out.kv
        if append:
            state.hidden = hidden[:, -1]
            if not prefill:
                state.seq = state.seq.cat(new)
            if self.use_cache:
                state.kv = kv if state.kv is None or prefill else [
                    (torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                    for (k0, v0), (k1, v1) in zip(state.kv, kv, strict=True)
                ]
        return hidden, out.eps

    # ------------------------------------------------------------------------------------------- text
    def banned_text_tokens(self) -> list[int]:
        """Ids text decoding never samples: padding, and ``<eoi>`` (appended after an image, never sampled)."""
        return [self.special.pad, self.special.eoi]

    def _pick(self, logits: Tensor, cfg: SamplingConfig, gen: torch.Generator, allow_eos: bool = True) -> Tensor:
        """logits [B, V] -> token ids [B]."""
        logits = logits.float().clone()  # the bans below must not write into the caller's tensor
        banned = self.banned_text_tokens() + ([] if allow_eos else [self.special.eos])
        logits[:, banned] = -float("inf")
        return sample_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p, gen)

    def _append_token(self, state: State, token: Tensor) -> Tensor:
        """Append one token per row [B]; returns the hidden state at it [B, D]."""
        none = torch.full_like(token[:, None], -1)
        hidden, _ = self._run(state, self._extend(state, token[:, None], none, none), append=True)
        return hidden[:, -1]

    def decode_text(self, state: State, hidden: Tensor, cfg: SamplingConfig, gen: torch.Generator,
                    stop: tuple[int, ...] = ()) -> tuple[list[list[int]], Tensor]:
        """Decode up to ``cfg.max_new_tokens`` per row; a row stops after ``<eos>`` or a token in ``stop``.
        Returns the new ids per row (incl. the stop token) and the final hidden [B, D]."""
        B = hidden.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        stops = torch.tensor([self.special.eos, *stop], device=self.device)
        for step in range(cfg.max_new_tokens):
            token = self._pick(self.model.logits(hidden), cfg, gen, allow_eos=step >= cfg.min_new_tokens)
            token = torch.where(done, torch.full_like(token, self.special.pad), token)
            for i in (~done).nonzero()[:, 0].tolist():
                out[i].append(int(token[i]))
            done |= torch.isin(token, stops)
            if done.all():
                break
            hidden = self._append_token(state, token)
        return out, hidden

    # ----------------------------------------------------------------------------------------- images
    def _image_positions(self, state: State) -> Seq:
        """The P patch positions of one new image per row (image ids continue after the state's images)."""
        B, P = state.rows, self.cfg.patches_per_image
        first = state.latents.shape[0]
        ids = (first + torch.arange(B, device=self.device))[:, None].expand(B, P)
        return self._extend(state, torch.full((B, P), self.special.pad, device=self.device), ids,
                            torch.arange(P, device=self.device).expand(B, P))

    def denoise(self, states: list[State], cfg: SamplingConfig, gen: torch.Generator) -> Tensor:
        """Generate one image per row of ``states[0]`` (whose last token is ``<boi>``); ``states[1]``, if
        given, is the unconditional prefix for guidance (same rows). Cond and uncond rows run in ONE forward
        per step. Writes the clean image (t = 0) into ``states[0]`` only. Returns latents [B, C, h, w]."""
        cond = states[0]
        B = cond.rows
        guided = len(states) > 1 and cfg.guidance_scale != 1
        run = _stack([cond, states[1]]) if guided else cond  # [2B rows] or [B rows]
        new = self._image_positions(run)
        n_prev = run.latents.shape[0]  # earlier images: clean, t = 0
        T = self.diffusion.num_train_timesteps

        def predict(x_in: Tensor, step_t: Tensor) -> Tensor:
            """The (guided) model output at the scaled sample x_in [B, C, h, w] and the step's t (0-d, t units:
            long for ε/v, σ·T float for flow, as training feeds it) -> [B, C, h, w]."""
            lat = torch.cat([run.latents, x_in, x_in] if guided else [run.latents, x_in])
            t_now = step_t.to(self.device).expand(lat.shape[0] - n_prev)
            t = torch.cat([torch.zeros(n_prev, dtype=step_t.dtype, device=self.device), t_now])
            out = self._run(run, new, append=False, latents=lat, t=t)[1][n_prev:]  # [B or 2B, C, h, w]
            if not guided:
                return out
            # Guidance is linear in the output, so it means the same for ε, v and velocity.
            out_c, out_u = out[:B], out[B:]
            lo, hi = cfg.guidance_interval
            # On training's 0..T-1 scale: flow's first step (σ = 1, t = T) is that scale's pure-noise end, so
            # the default interval (0, T) guides every step for all objectives.
            t_scale = min(float(step_t), T - 1)
            return out_u + cfg.guidance_scale * (out_c - out_u) if lo <= t_scale < hi else out_c

        x = self.diffusion.sample(predict, (B, *self.cfg.latent_shape), cfg.scheduler, cfg.steps, gen, self.device)
        # Write the clean image into the conditional sequence at t = 0 (its keys/values join the cache).
        new = self._image_positions(cond)
        cond.latents = torch.cat([cond.latents, x])
        self._run(cond, new, append=True)
        for row, latent in zip(cond.images, x, strict=True):
            row.append(latent)
        return x

    # ------------------------------------------------------------------------------------- entry points
    def generate_images(self, captions: list[list[int]], cfg: SamplingConfig) -> Tensor:
        """Caption token ids (no specials) -> latents [B, C, h, w], batched, with guidance."""
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        sp = self.special
        cond, _ = self.start([[Text([sp.bos, *c, sp.boi])] for c in captions])
        states = [cond]
        if cfg.guidance_scale != 1:
            states.append(self.start([[Text([sp.bos, sp.boi])] for _ in captions])[0])
        return self.denoise(states, cfg, gen)

    def caption(self, latents: Tensor, cfg: SamplingConfig) -> list[list[int]]:
        """Clean image latents [B, C, h, w] (fed at t = 0) -> caption ids per row (up to <eos>, excluded)."""
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        sp = self.special
        state, hidden = self.start([[Text([sp.bos]), Image(lat), Text([])] for lat in latents])
        ids, _ = self.decode_text(state, hidden, cfg, gen)
        return [[i for i in row if i != sp.eos] for row in ids]

    def generate(self, prompt: list[int], cfg: SamplingConfig, max_images: int = 4) -> list:
        """Mixed-modal continuation of one prompt (ids, no specials): text until ``<boi>`` -> an image ->
        ``<eoi>`` -> text, until ``<eos>``. Returns a list of segments: lists of ids and latents [C, h, w]."""
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        sp = self.special
        state, hidden = self.start([[Text([sp.bos, *prompt])]])
        output: list = []
        while True:
            ids, hidden = self.decode_text(state, hidden, cfg, gen, stop=(sp.boi,))
            text = [i for i in ids[0] if i not in (sp.boi, sp.eos)]
            if text:
                output.append(text)
            if not ids[0] or ids[0][-1] != sp.boi or len(state.images[0]) >= max_images:
                return output
            self._append_token(state, torch.tensor([sp.boi], device=self.device))
            states = [state]
            if cfg.guidance_scale != 1:
                states.append(self.start([[Text([sp.bos, sp.boi])]])[0])
            output.append(self.denoise(states, cfg, gen)[0])
            hidden = self._append_token(state, torch.tensor([sp.eoi], device=self.device))


def sample_logits(logits: Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> Tensor:
    """Draw one id per row from logits [B, V] (float): greedy at temperature 0, else softmax(logits / temperature)
    restricted to the ``top_k`` most likely ids (0 = all) and the ``top_p`` nucleus (1 = all). Returns [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


def _stack(states: list[State]) -> State:
    """Rows of several states in one, each left-padded to the longest (pads: doc id -1, zero keys/values);
    image ids of later states are shifted past the earlier states' images."""
    L = max(s.seq.tokens.shape[1] for s in states)
    seqs, kv_parts, offset = [], [], 0
    for s in states:
        pad = L - s.seq.tokens.shape[1]
        seqs.append(s.seq.shift_images(offset).left_pad(pad))
        offset += s.latents.shape[0]
        if s.kv is not None:
            pad_kv = lambda x, pad=pad: torch.nn.functional.pad(x, (0, 0, pad, 0))  # noqa: E731
            kv_parts.append([(pad_kv(k), pad_kv(v)) for k, v in s.kv])
    kv = None
    if kv_parts:
        kv = [(torch.cat([p[i][0] for p in kv_parts]), torch.cat([p[i][1] for p in kv_parts]))
              for i in range(len(kv_parts[0]))]
    hidden = None
    if all(s.hidden is not None for s in states):
        hidden = torch.cat([s.hidden for s in states])
    return State(seq=Seq.stack(seqs), latents=torch.cat([s.latents for s in states]), kv=kv, hidden=hidden)
