"""Generation from a discrete-token (Chameleon-style) model: images are ``<boi> c_1 .. c_P <eoi>`` with the codes
``c_i`` of a VQ tokenizer in the vocabulary after the text ids (``SpecialIds.first_code``).

Everything but the image step is :class:`TransfusionSampler`'s: the left-padded sequence state, the KV cache (or
full recomputation with ``use_cache=False``, the reference the tests compare against), text decoding, captioning
and the mixed text -> image -> text loop. An image is P steps of KV-cached next-token decoding restricted to the
code ids, with classifier-free guidance on the logits: the conditional and the unconditional (``<bos> <boi>``, the
null caption of training's caption-dropped documents) rows run in ONE forward per code, and the guided logits
``u + s·(c - u)`` are sampled at ``image_temperature`` / ``image_top_k``. Text decoding never samples a code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_transfusion.batch import Image, SpecialIds, Text, code_segment
from lit_transfusion.generation import SamplingConfig, State, TransfusionSampler, _stack, sample_logits
from lit_transfusion.model import TransfusionModel


class ChameleonSampler(TransfusionSampler):
    """Samples text and images (as codes) from a discrete-token model.

    Args:
        model: a TransfusionModel without a patcher whose vocabulary is ``first_code + codebook_size`` ids and whose
            ``latent_shape`` is the code grid ``(1, h, w)``.
        special: special ids, ``first_code`` included.
        use_cache: False recomputes the whole sequence at every step.
    """

    def __init__(self, model: TransfusionModel, special: SpecialIds, use_cache: bool = True):
        if special.first_code < 0:
            raise ValueError("ChameleonSampler needs special.first_code (the id of image code 0)")
        super().__init__(model, diffusion=None, special=special, use_cache=use_cache)
        self.first_code = special.first_code
        self.codebook_size = model.cfg.vocab_size - special.first_code
        _, h, w = model.cfg.latent_shape
        self.code_shape = (h, w)

    def banned_text_tokens(self) -> list[int]:
        return super().banned_text_tokens() + list(range(self.first_code, self.first_code + self.codebook_size))

    def _code_logits(self, hidden: Tensor) -> Tensor:
        """hidden [R, D] -> logits over the codes only [R, K] (float32)."""
        return self.model.logits(hidden)[:, self.first_code:].float()

    def denoise(self, states: list[State], cfg: SamplingConfig, gen: torch.Generator) -> Tensor:
        """Decode one image per row of ``states[0]`` (whose last token is ``<boi>``); ``states[1]``, if given, is
        the unconditional prefix for guidance. Writes the codes into ``states[0]`` (not ``<eoi>``: the caller
        appends it, as for a diffused image). Returns the codes [B, 1, h, w] long."""
        cond = states[0]
        B, (h, w) = cond.rows, self.code_shape
        guided = len(states) > 1 and cfg.guidance_scale != 1
        run = _stack([cond, states[1]]) if guided else cond  # [2B rows] or [B rows]; _stack copies: cond unchanged
        codes = []
        for k in range(h * w):
            logits = self._code_logits(run.hidden)  # [B or 2B, K]
            if guided:
                cond_logits, uncond_logits = logits[:B], logits[B:]
                logits = uncond_logits + cfg.guidance_scale * (cond_logits - uncond_logits)
            code = sample_logits(logits, cfg.image_temperature, cfg.image_top_k, 1.0, gen)  # [B]
            codes.append(code)
            token = code + self.first_code
            if not guided or k < h * w - 1:  # the last code of a guided run is written into cond below
                self._append_token(run, token.repeat(2) if guided else token)
        codes = torch.stack(codes, 1)  # [B, P]
        if guided:
            # The codes join the conditional sequence in one forward (their keys/values enter its cache).
            none = torch.full_like(codes, -1)
            self._run(cond, self._extend(cond, codes + self.first_code, none, none), append=True)
        grid = codes.view(B, 1, h, w)
        for row, g in zip(cond.images, grid, strict=True):
            row.append(g)
        return grid

    def caption(self, latents: Tensor, cfg: SamplingConfig) -> list[list[int]]:
        """Image codes [B, h, w] or [B, 1, h, w] (long) -> caption ids per row (up to <eos>, excluded)."""
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        sp = self.special
        state, hidden = self.start([[Text([sp.bos]), code_segment(c, sp), Text([])] for c in latents])
        ids, _ = self.decode_text(state, hidden, cfg, gen)
        return [[i for i in row if i != sp.eos] for row in ids]

    def start(self, prompts: list[list]) -> tuple[State, Tensor]:
        """As :meth:`TransfusionSampler.start`; an ``Image`` segment of codes is laid out as its code tokens."""
        prompts = [[code_segment(s.latent, self.special) if isinstance(s, Image) else s for s in p] for p in prompts]
        return super().start(prompts)
