"""CUDA paths on one GPU: checks, then timings. Needs a CUDA device; prints one line per result.

    python benchmarks/cuda_check.py [--config configs/shapes/tiny.yaml] [--steps 20]

Checks:
- flex attention (block mask) against SDPA (dense bool mask): same loss and gradients on a packed batch;
- cached and recomputed image sampling give the same latents on the GPU;
- a few optimizer steps under ``bf16-mixed`` with Lightning's ``fsdp`` strategy and with
  ``ModelParallelStrategy`` (FSDP2 ``fully_shard``, see ``TransfusionModule.configure_model``).
Timings (median step, forward + backward + AdamW): SDPA vs flex, fp32 vs bf16 autocast, on the config's batch
and on a long-row batch (``--long_seq_len``) where the block-sparse mask skips most of the score matrix.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lit_transfusion.commands.cli import build_cli  # noqa: E402


def build(config: str, *overrides: str):
    sys.argv = sys.argv[:1]
    cli = build_cli(["--config", config, "--trainer.logger=false", *overrides], run=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def compare_attention(module, batch) -> None:
    results = {}
    for attention in ("sdpa", "flex"):
        module.attention = attention
        module.zero_grad(set_to_none=True)
        out = module.losses(batch, generator=torch.Generator("cuda").manual_seed(0))
        out["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        results[attention] = (out["loss_text"].item(), out["loss_image"].item(), grads)
    (ts, is_, gs), (tf, if_, gf) = results["sdpa"], results["flex"]
    rel = ((gs - gf).norm() / gs.norm()).item()
    ok = abs(ts - tf) < 1e-3 * abs(ts) and abs(is_ - if_) < 1e-3 * abs(is_) and rel < 1e-3
    print(f"[{'ok' if ok else 'FAIL'}] flex vs sdpa: loss_text {ts:.5f} / {tf:.5f}, loss_image {is_:.5f} / {if_:.5f}, "
          f"grad rel diff {rel:.2e}")
    module.zero_grad(set_to_none=True)


def compare_sampling(module, dm) -> None:
    from lit_transfusion.batch import SpecialIds
    from lit_transfusion.generation import SamplingConfig

    special = SpecialIds(**dm.special_ids)
    captions = [dm.tokenizer.encode(c) for c in ("a red circle", "a blue square left of a green triangle")]
    cfg = SamplingConfig(scheduler="ddim", steps=20, guidance_scale=3.0, seed=0)
    module.eval()
    with torch.no_grad():
        outs = [module.sampler(special, use_cache=c).generate_images(captions, cfg) for c in (True, False)]
    module.train()
    diff = (outs[0] - outs[1]).abs().max().item()
    print(f"[{'ok' if diff < 1e-3 else 'FAIL'}] cached vs uncached sampling on cuda: max |Δlatent| {diff:.2e}")


def time_steps(module, batches, attention: str, bf16: bool) -> float:
    module.attention = attention
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    times = []
    for i, b in enumerate(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = module.losses(b)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:  # warm-up: compilation of the flex kernels, allocator
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timings(module, dm, label: str, steps: int) -> None:
    loader = iter(dm.train_dataloader())
    batches = [next(loader).to("cuda") for _ in range(steps + 3)]
    tokens = statistics.mean(int((b.seq.doc_ids >= 0).sum()) for b in batches)
    base = None
    for attention in ("sdpa", "flex"):
        for bf16 in (False, True):
            sec = time_steps(module, batches, attention, bf16)
            base = base or sec
            print(f"[time] {label}: {attention:4s} {'bf16' if bf16 else 'fp32'}  {sec * 1e3:7.1f} ms/step  "
                  f"{tokens / sec:10,.0f} tok/s  ({base / sec:.2f}x sdpa fp32)")


def lightning_fit(config: str, strategy: str) -> None:
    sys.argv = sys.argv[:1]
    args = ["--config", config, "--trainer.logger=false", "--trainer.max_steps=10", "--trainer.val_check_interval=10",
            "--trainer.limit_val_batches=1", "--trainer.precision=bf16-mixed", "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=null", "--trainer.enable_progress_bar=false", "--trainer.accelerator=gpu"]
    if strategy == "fsdp2":
        args.append('--trainer.strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}')
    else:
        args.append(f"--trainer.strategy={strategy}")
    if strategy != "auto":  # Lightning's FSDP precision plugins refuse norm clipping
        args.append("--trainer.gradient_clip_val=null")
    t0 = time.perf_counter()
    try:
        cli = build_cli(["fit", *args])
        metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        print(f"[ok] fit 10 steps bf16-mixed strategy={strategy}: {time.perf_counter() - t0:.1f} s, {metrics}")
    except Exception as e:  # report and go on to the next check
        print(f"[FAIL] fit strategy={strategy}: {type(e).__name__}: {e}")


def main(config: str = "configs/shapes/tiny.yaml", steps: int = 20, long_seq_len: int = 1024) -> None:
    """CUDA paths on one GPU: checks, then timings. Needs a CUDA device; prints one line per result.

    Args:
        config: the training config (LightningCLI) whose model and data are checked and timed
        steps: timed steps per setting (after 3 warm-up steps)
        long_seq_len: row length of the long-row batch (small model, 8 rows)
    """
    if not torch.cuda.is_available():
        sys.exit("cuda_check.py needs a CUDA device")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")

    module, dm = build(config)
    module.cuda().train()
    batch = next(iter(dm.train_dataloader())).to("cuda")
    compare_attention(module, batch)
    compare_sampling(module, dm)
    timings(module, dm, f"{config} (16x128)", steps)

    long_module, long_dm = build(config, "--model.init_args.size=small",
                                 f"--data.init_args.seq_len={long_seq_len}", "--data.init_args.batch_size=8",
                                 f"--model.init_args.max_seq_len={long_seq_len}")
    long_module.cuda().train()
    compare_attention(long_module, next(iter(long_dm.train_dataloader())).to("cuda"))
    timings(long_module, long_dm, f"small, 8x{long_seq_len}", steps)

    for strategy in ("auto", "fsdp", "fsdp2"):
        lightning_fit(config, strategy)


if __name__ == "__main__":
    from jsonargparse import ArgumentParser

    # Not auto_cli: it adds its own --config (a file of option values) and drops a function's ``config`` argument.
    parser = ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_function_arguments(main, as_group=False)
    main(**parser.parse_args().as_dict())
