"""Which training precision this machine runs fast: bf16 only where the hardware computes it natively.

Why this exists: on a CPU without bf16 units (e.g. AVX2-only x86) PyTorch emulates bf16 matmuls, which are
then hundreds of times slower than fp32, so ``precision: bf16-mixed`` turns a minutes-long run into hours.
CPUs with AVX512-BF16 or AMX (and CUDA GPUs from Ampere on) compute bf16 natively and run it faster than fp32.

Nothing is probed at import time; every check runs on first call.

Environment override (for tests, or to force a decision the detection gets wrong):

    LIT_TRANSFUSION_CPU_BF16=1   treat the CPU as having native bf16
    LIT_TRANSFUSION_CPU_BF16=0   treat the CPU as having none
"""

from __future__ import annotations

import functools
import os
import sys
import time

import torch

ENV_CPU_BF16 = "LIT_TRANSFUSION_CPU_BF16"

# /proc/cpuinfo flags that mean bf16 arithmetic in hardware: x86 (AVX512-BF16, AMX) and aarch64 (FEAT_BF16).
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

# Where no flag list is available (macOS, Windows) the probe decides "native": emulated bf16 is ~100-300x
# slower than fp32, native bf16 is roughly as fast or faster, so any threshold in between separates them.
_PROBE_NATIVE_RATIO = 0.5

# bf16-mixed is chosen on CPU only where the probe shows it clearly ahead of fp32: mixed precision also pays
# for casts, so a bf16 matmul that merely matches fp32 would not make training faster.
_CPU_BF16_MIN_SPEEDUP = 1.2


def cpu_capability() -> str:
    """PyTorch's CPU kernel capability, e.g. "AVX2", "AVX512", "SVE256", "DEFAULT" (for messages)."""
    return torch.backends.cpu.get_cpu_capability()


def _env_override() -> bool | None:
    """The value of LIT_TRANSFUSION_CPU_BF16 as a bool, or None when unset/empty."""
    value = os.environ.get(ENV_CPU_BF16, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_CPU_BF16}={value!r}: expected 0 or 1")


@functools.cache
def _cpu_bf16_detected() -> bool:
    """Hardware detection without the override; cached because the CPU does not change within a process."""
    # torch's cpuinfo-based table (x86): explicit avx512_bf16 / amx_bf16 entries.
    get_caps = getattr(torch.cpu, "get_capabilities", None)
    if get_caps is not None:
        try:
            caps = get_caps()
        except Exception:  # noqa: BLE001 - the table is a convenience; fall through to the other sources
            caps = {}
        if caps.get("avx512_bf16") or caps.get("amx_bf16"):
            return True
    # get_cpu_capability() names the kernels torch dispatches to; AVX2 (or no AVX) rules bf16 units out on x86.
    if cpu_capability() in ("AVX2", "NO AVX"):
        return False
    if sys.platform.startswith("linux"):
        flags = _proc_cpuinfo_flags()
        if flags is not None:
            return any(f in flags for f in _BF16_CPU_FLAGS)
    # macOS (arm64), Windows, or no readable /proc/cpuinfo: measure.
    rates = matmul_rates()
    return rates["bf16"] >= _PROBE_NATIVE_RATIO * rates["fp32"]


def _proc_cpuinfo_flags() -> set[str] | None:
    """The CPU flags of /proc/cpuinfo ("flags" on x86, "Features" on aarch64), or None if unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags or None


def cpu_bf16_native() -> bool:
    """True only where the CPU has bf16 compute units (AVX512-BF16, AMX-BF16, Arm BF16).

    Decided from ``torch.backends.cpu.get_cpu_capability()`` and the CPU flags (torch's cpuinfo table,
    /proc/cpuinfo on Linux); elsewhere from :func:`matmul_rates`. ``LIT_TRANSFUSION_CPU_BF16=0|1`` overrides.
    """
    forced = _env_override()
    if forced is not None:
        return forced
    return _cpu_bf16_detected()


def matmul_rates(n: int = 256, repeats: int = 3, threads: int | None = 1) -> dict[str, float]:
    """GFLOP/s of an ``n×n @ n×n`` matmul on CPU in fp32 and in bf16 (best of ``repeats``).

    Kept short on purpose: at n=256 one emulated bf16 matmul (33.5 MFLOP at ~0.3-0.8 GFLOP/s) takes ~0.1 s,
    so the whole probe stays well under a second even on a CPU without bf16 units.
    Runs on ``threads`` threads (default 1, restored afterwards; None = torch's current setting): the
    bf16/fp32 ratio is a property of each core, and a small multi-threaded matmul on a busy machine measures
    thread contention instead (seen: fp32 at 1.4 GFLOP/s on 2 threads vs 60 on 1 with the cores shared).
    Returns ``{"fp32": ..., "bf16": ...}``.
    """
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rates = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(n, n, dtype=dtype)
            b = torch.randn(n, n, dtype=dtype)
            best = float("inf")
            for _ in range(max(1, repeats)):  # best-of: the first call also pays one-time kernel set-up
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
            rates[name] = 2 * n**3 / max(best, 1e-9) / 1e9
    finally:
        torch.set_num_threads(saved)
    return rates


def resolve_precision(requested=None, accelerator: str = "auto") -> tuple[str, str]:
    """The Lightning ``Trainer(precision=...)`` to use, and why.

    An explicit ``requested`` (anything but None or "auto") is returned unchanged. Otherwise: CUDA with bf16
    support -> "bf16-mixed"; CUDA without -> "32-true"; CPU -> "bf16-mixed" only where the CPU has native bf16
    and a short matmul probe shows bf16 at least 1.2x the fp32 rate, else "32-true". Decided once per process
    (per accelerator).
    """
    if requested is not None and str(requested) != "auto":
        return requested, f"explicit precision {requested!r}"
    return _auto_precision(str(accelerator).lower())


@functools.cache
def _auto_precision(accelerator: str) -> tuple[str, str]:
    """The automatic choice of :func:`resolve_precision`; cached so the probe runs at most once per process."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"CUDA {name}: bf16 supported -> bf16-mixed"
        return "32-true", f"CUDA {name}: no bf16 support -> 32-true"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"accelerator {accelerator!r}: no automatic bf16 choice -> 32-true"
    capability = cpu_capability()
    native = cpu_bf16_native()
    rates = matmul_rates()
    fast = rates["bf16"] >= _CPU_BF16_MIN_SPEEDUP * rates["fp32"]
    precision = "bf16-mixed" if native and fast else "32-true"
    why = "" if native else ", no native bf16"
    if native and not fast:
        why = f", bf16 not {_CPU_BF16_MIN_SPEEDUP}x fp32"
    return precision, (f"CPU {capability}{why}: bf16 matmul {_fmt(rates['bf16'])} GFLOP/s vs fp32 "
                       f"{_fmt(rates['fp32'])} GFLOP/s (1 thread) -> {precision}")


def _fmt(rate: float) -> str:
    """A GFLOP/s figure with two significant digits below 10 (0.31), none above (80)."""
    return f"{rate:.2g}" if rate < 10 else f"{rate:.0f}"


def _clear_caches() -> None:
    """Forget the cached detection and decision (tests that change the environment call this)."""
    _cpu_bf16_detected.cache_clear()
    _auto_precision.cache_clear()


__all__ = ["ENV_CPU_BF16", "cpu_bf16_native", "cpu_capability", "matmul_rates", "resolve_precision"]


# CPU flags that decide which precision is fast here (the classes this project's timings name).
CPU_CLASS_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16")


def machine() -> dict:
    """What a timing or a metric was measured on: CPU model, its precision-relevant flags, usable cores, the GPU
    (or None) and the torch version. Recorded in every run's ``metrics.json``."""
    import os

    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.partition(":")[2].strip() for line in f if line.lower().startswith("model name")),
                         None)
    except OSError:
        pass
    flags = _proc_cpuinfo_flags() or set()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cpu_flags": [f for f in CPU_CLASS_FLAGS if f in flags], "cores": cores, "gpu": gpu,
            "torch": torch.__version__}
