"""Training-step benchmark: step time, tokens/s, peak RSS and model FLOPs utilisation (MFU), per precision.

    python benchmarks/train_step.py --config configs/shapes/tiny.yaml [--steps 30] [--precision [32,bf16-mixed]]
        [--override+=--model.init_args.patcher=unet ...]

By default "32" is timed, and "bf16-mixed" too where the hardware computes bf16 natively (a CUDA GPU with bf16,
or a CPU with AVX512-BF16/AMX: ``lit_transfusion.hardware.cpu_bf16_native``); elsewhere bf16 is emulated, hundreds
of times slower than fp32, so it is skipped with a line saying so. An explicit ``--precision`` list is timed as given.

FLOPs of one optimizer step (forward + backward) are counted with ``torch.utils.flop_counter.FlopCounterMode``;
the "peak" is the FLOP/s of a large matmul in the precision's compute dtype, measured in the same process, so
MFU is a ratio of two numbers taken on the same machine at the same time (this is what makes it comparable
across noisy runs). Precisions are timed in interleaved rounds on the same batches; mixed precision runs under
Lightning's own ``MixedPrecision`` plugin context, as ``trainer.precision`` would.

Then (``--fit_steps``, default 60) the same config's own ``trainer.fit`` is timed step by step, and its step is
read against the bare step: the time between steps (the data loader building rows in the training process) and
inside a step beyond the bare forward/backward/clip/optimizer (Lightning's loop, logging, callbacks).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lit_transfusion.commands.cli import build_cli  # noqa: E402
from lit_transfusion.hardware import cpu_bf16_native, cpu_capability  # noqa: E402


def matmul_peak(n: int = 2048, repeats: int = 10, device: str = "cpu", dtype=torch.float32) -> float:
    """Best-of FLOP/s of an ``n×n @ n×n`` matmul (2·n³ FLOPs)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# Trainer precisions this script times, and the dtype their matmuls run in (for the same-dtype matmul peak).
COMPUTE_DTYPE = {"32": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# The same names as --precision accepts them: 32 is a number on the command line ([32,bf16-mixed]).
Precision = Literal[32, "bf16-mixed", "16-mixed"]


def default_precisions(device: str) -> tuple[list[str], str | None]:
    """The precisions timed without ``--precision``, and the line explaining a skipped bf16 (or None)."""
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return ["32", "bf16-mixed"], None
        return ["32"], (f"bf16-mixed skipped: {torch.cuda.get_device_name()} has no bf16 support; "
                        "pass --precision '[bf16-mixed]' to time it anyway")
    if cpu_bf16_native():
        return ["32", "bf16-mixed"], None
    return ["32"], (f"bf16-mixed skipped: this CPU has no native bf16 (capability {cpu_capability()}); "
                    "pass --precision '[bf16-mixed]' to time it anyway")


def peak_size(dtype: torch.dtype, device: str) -> tuple[int, int, str]:
    """(n, repeats, note) of the matmul peak: bounded where the CPU emulates the dtype.

    An emulated bf16/fp16 matmul runs at well under 1 GFLOP/s on CPU, so 10 repeats of 2048^2 would take
    minutes; 2 repeats of 512^2 (0.27 GFLOP each) take seconds and still give the rate to a few percent.
    """
    if device == "cpu" and dtype != torch.float32 and not (dtype == torch.bfloat16 and cpu_bf16_native()):
        return 512, 2, f"; 2 repeats: no native {str(dtype).removeprefix('torch.')} on this CPU"
    return 2048, 10, ""


def precision_context(precision: str, device: str):
    """The autocast context Lightning's trainer uses for ``precision`` ("32" -> none)."""
    if precision == "32":
        return contextlib.nullcontext()
    return MixedPrecision(precision, device).forward_context()


class StepClock(Callback):
    """Wall time of each training step in ``trainer.fit``, split into the time between steps (the loop fetching
    the next batch from the data loader) and the time inside the step (forward, backward, clipping, optimizer,
    logging and every callback's batch hooks)."""

    def __init__(self):
        self.starts, self.ends = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())

    def split(self, skip: int = 3) -> tuple[float, float, float]:
        """Median seconds per step: (whole step, between steps, inside the step), the first ``skip`` left out."""
        inside = [e - s for s, e in zip(self.starts, self.ends, strict=False)][skip:]
        between = [s - e for e, s in zip(self.ends, self.starts[1:], strict=False)][skip:]
        whole = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][skip:]
        return statistics.median(whole), statistics.median(between), statistics.median(inside)


def time_fit(config: str, overrides: list[str], steps: int) -> tuple[str, tuple[float, float, float]]:
    """(precision, StepClock.split) of ``steps`` optimizer steps of the config's own ``trainer.fit`` (its data
    loader, clipping, optimizer and per-step logging to a TensorBoard run in a temporary folder); no validation."""
    with tempfile.TemporaryDirectory() as tmp:
        clock = StepClock()
        cli = build_cli(["--config", config, *overrides, f"--trainer.max_steps={steps + 4}", "--trainer.max_time=null",
                         "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                         f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.default_root_dir={tmp}"],
                        run=False)
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, cli.datamodule)
        return str(cli.trainer.precision), clock.split()


def main(config: str = "configs/shapes/tiny.yaml", steps: int = 30, precision: list[Precision] | None = None,
         override: list[str] | None = None, fit_steps: int = 60) -> None:
    """Training-step benchmark: step time, tokens/s, peak RSS and model FLOPs utilisation (MFU), per precision.

    Args:
        config: the training config (LightningCLI) whose model and data are timed
        steps: timed steps per precision (after 3 warm-up steps)
        precision: trainer precisions to time, e.g. [32,bf16-mixed]; the first is the baseline of the speed ratio
            (default: 32, plus bf16-mixed where the GPU/CPU has native bf16)
        override: arguments passed on to the training CLI, one per --override+=..., e.g.
            --override+=--model.init_args.patcher=unet
        fit_steps: then time this many steps of the config's own ``trainer.fit`` (data loader, clipping, logging:
            the main job's step) against the bare step above in its precision; 0 skips it
    """
    overrides = list(override or [])
    sys.argv = sys.argv[:1]  # the CLI gets its arguments explicitly below
    cli = build_cli(["--config", config, "--trainer.logger=false", *overrides], run=False)
    module, dm = cli.model, cli.datamodule
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skipped = None
    if precision is None:
        precisions, skipped = default_precisions(device)
    else:
        precisions = [str(p) for p in precision]  # COMPUTE_DTYPE's keys: "32", not 32
    module.to(device).train()
    dm.prepare_data()
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    batches = [next(loader).to(device) for _ in range(steps + 3)]
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)  # as the module's optimizer
    clip = cli.trainer.gradient_clip_val

    def step(batch, precision: str):
        with precision_context(precision, device):
            out = module.losses(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()

    with FlopCounterMode(display=False) as counter:
        out = module.losses(batches[0])
        out["loss"].backward()
    flops_per_step = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {p: [] for p in precisions}
    for p in precisions:
        for b in batches[:3]:
            step(b, p)
    for b in batches[3:]:  # interleaved, so a noisy spell on the machine hits every precision alike
        for p in precisions:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(b, p)
            if device == "cuda":
                torch.cuda.synchronize()
            times[p].append(time.perf_counter() - t0)

    tokens = statistics.mean(int((b.seq.doc_ids >= 0).sum()) for b in batches)
    images = statistics.mean(b.num_images for b in batches)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_params = sum(p.numel() for p in module.parameters())
    print(f"config           {config} {' '.join(overrides)}")
    print(f"device           {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"params           {n_params / 1e6:.2f} M")
    print(f"batch            {batches[0].seq.shape[0]} rows x {batches[0].seq.shape[1]} positions, "
          f"{tokens:.0f} real tokens, {images:.1f} images")
    print(f"FLOPs/step       {flops_per_step / 1e9:.2f} GFLOP (forward + backward)")
    if skipped:
        print(skipped)
    base = statistics.median(times[precisions[0]])
    for p in precisions:
        dtype = COMPUTE_DTYPE[p]
        n, repeats, note = peak_size(dtype, device)
        peak = matmul_peak(n, repeats, device=device, dtype=dtype)
        sec = statistics.median(times[p])
        print(f"--- precision {p}")
        print(f"step time        {sec * 1000:.0f} ms (median of {len(times[p])}; min {min(times[p]) * 1000:.0f}, "
              f"max {max(times[p]) * 1000:.0f}); {base / sec:.2f}x the speed of precision {precisions[0]}")
        print(f"tokens/s         {tokens / sec:,.0f}")
        print(f"images/s         {images / sec:,.1f}")
        print(f"achieved         {flops_per_step / sec / 1e9:.1f} GFLOP/s")
        print(f"matmul peak      {peak / 1e9:.1f} GFLOP/s ({n}^2 {str(dtype).removeprefix('torch.')}, "
              f"same process{note})")
        print(f"MFU              {flops_per_step / sec / peak:.2f}")
    print(f"peak RSS         {rss_mb:,.0f} MB")
    if fit_steps > 0:
        loader_s = time_loader(dm, steps)
        fit_precision, (whole, between, inside) = time_fit(config, overrides, fit_steps)
        key = fit_precision.removesuffix("-true")  # the trainer's "32-true" is this script's "32"
        bare = statistics.median(times[key]) if key in times else float("nan")
        print(f"--- trainer.fit, precision {fit_precision} (median of {fit_steps} steps; the bare step above is 1.00)")
        print(f"step time        {whole * 1000:.0f} ms; {whole / bare:.2f}x the bare step")
        print(f"  between steps  {between * 1000:.0f} ms ({between / whole:.0%}): fetching the next batch "
              f"(the data loader alone: {loader_s * 1000:.0f} ms per batch)")
        print(f"  inside a step  {inside * 1000:.0f} ms ({inside / bare:.2f}x the bare step: forward, backward, "
              f"clipping, optimizer, logging, callbacks)")


def time_loader(dm, n: int) -> float:
    """Median seconds per batch of the training data loader (the rows built and packed in this process)."""
    loader = iter(dm.train_dataloader())
    next(loader)
    seconds = []
    for _ in range(n):
        t0 = time.perf_counter()
        next(loader)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


if __name__ == "__main__":
    from jsonargparse import ArgumentParser

    # Not auto_cli: it adds its own --config (a file of option values) and drops a function's ``config`` argument.
    parser = ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_function_arguments(main, as_group=False)
    main(**parser.parse_args().as_dict())
