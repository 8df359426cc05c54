"""Generation benchmark for the tiny model: seconds per image by step count and guidance, KV-cached versus
recomputed denoising as the prompt grows, and text tokens/s with and without the cache.

    python benchmarks/generation.py [--ckpt_path runs/.../last.ckpt] [--quick true]

Timings do not depend on the weights, so without a checkpoint a freshly initialized tiny model is used.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lit_transfusion.batch import SpecialIds  # noqa: E402
from lit_transfusion.generation import SamplingConfig  # noqa: E402
from lit_transfusion.module import TransfusionModule  # noqa: E402


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(ckpt_path: str | None = None, quick: bool = False) -> None:
    """Generation benchmark: seconds per image by steps and guidance, KV-cached against recomputed denoising, text
    tokens/s; without a checkpoint, a freshly initialized tiny model (timings do not depend on the weights).

    Args:
        ckpt_path: a trained checkpoint (optional)
        quick: fewer settings (smoke test)
    """
    special = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
    if ckpt_path:
        module = TransfusionModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
        special = SpecialIds(**module.hparams.special_ids)
    else:
        torch.manual_seed(0)
        module = TransfusionModule(vocab_size=512, special_ids=vars(special), latent_shape=(4, 8, 8),
                                   size="tiny", max_seq_len=512)
    module.eval()
    cached = module.sampler(special, use_cache=True)
    full = module.sampler(special, use_cache=False)
    V = module.hparams.vocab_size
    torch.manual_seed(1)
    caption = torch.randint(5, V, (8,)).tolist()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M params, "
          f"{module.model.cfg.patches_per_image} patches/image")

    print("\nseconds per image (batch of 4 images, cached, DDPM/DDIM)")
    step_counts = (20,) if quick else (250, 50, 20)
    for steps in step_counts:
        for scale in (1.0, 3.0):
            cfg = SamplingConfig(scheduler="ddpm" if steps == 250 else "ddim", steps=steps, guidance_scale=scale)
            sec = timed(functools.partial(cached.generate_images, [caption] * 4, cfg)) / 4
            print(f"  steps {steps:>3}  guidance {scale:.0f}{' (off)' if scale == 1 else '      '}  {sec:7.3f} s/image")

    print("\ncached vs recomputed denoising, 1 image, 20 DDIM steps, guidance 3")
    max_prompt = module.model.cfg.transformer.max_seq_len - module.model.cfg.patches_per_image - 4
    for n in (16, 64, 256):
        if n > max_prompt:
            print(f"  prompt {n:>3}: past max_seq_len, skipped")
            continue
        prompt = torch.randint(5, V, (n,)).tolist()
        cfg = SamplingConfig(scheduler="ddim", steps=20, guidance_scale=3.0)
        a = timed(functools.partial(cached.generate_images, [prompt], cfg))
        b = timed(functools.partial(full.generate_images, [prompt], cfg))
        print(f"  prompt {n:>3} tokens: cached {a / 20 * 1000:6.1f} ms/step   recomputed {b / 20 * 1000:6.1f} ms/step"
              f"   speed-up {b / a:4.1f}x")

    print("\ntext decoding, batch 1, 64-token prompt, 64 new tokens (greedy)")
    prompt = [[[special.bos, *torch.randint(5, V, (63,)).tolist()]]]  # one prompt of one text segment
    cfg = SamplingConfig(max_new_tokens=64, min_new_tokens=64)
    for name, s in (("cached", cached), ("recomputed", full)):
        def decode(s=s):
            state, hidden = s.start(prompt)
            return s.decode_text(state, hidden, cfg, torch.Generator())

        sec = timed(decode)
        n = len(decode()[0][0])
        print(f"  {name:<10} {n / sec:7.1f} tokens/s")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
