"""Automatic precision: bf16 only where the hardware computes it natively, explicit choices always win."""

import math
import time

import pytest
import torch

from lit_transfusion import hardware


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    """Every test decides from scratch, and leaves no faked decision cached for the rest of the session."""
    monkeypatch.delenv(hardware.ENV_CPU_BF16, raising=False)
    hardware._clear_caches()
    yield
    hardware._clear_caches()


def fake_probe(monkeypatch, fp32: float, bf16: float) -> list:
    """Replace the matmul probe with fixed rates; returns a list that records each call."""
    calls = []

    def probe(*args, **kwargs):
        calls.append(args)
        return {"fp32": fp32, "bf16": bf16}

    monkeypatch.setattr(hardware, "matmul_rates", probe)
    return calls


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_env_override_forces_the_answer(monkeypatch):
    monkeypatch.setenv(hardware.ENV_CPU_BF16, "0")
    assert hardware.cpu_bf16_native() is False
    monkeypatch.setenv(hardware.ENV_CPU_BF16, "1")
    assert hardware.cpu_bf16_native() is True
    monkeypatch.setenv(hardware.ENV_CPU_BF16, "maybe")
    with pytest.raises(ValueError, match=hardware.ENV_CPU_BF16):
        hardware.cpu_bf16_native()


def test_detection_agrees_with_the_cpu_flags():
    """Unforced, the answer follows the CPU (correct on both CPU classes, whichever runs the test)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if caps.get("avx512_bf16") or caps.get("amx_bf16"):
        assert hardware.cpu_bf16_native() is True
    elif torch.backends.cpu.get_cpu_capability() in ("AVX2", "NO AVX"):
        assert hardware.cpu_bf16_native() is False
    else:
        assert isinstance(hardware.cpu_bf16_native(), bool)


@pytest.mark.parametrize("requested", [None, "auto"])
def test_no_native_bf16_gives_fp32(monkeypatch, requested):
    no_cuda(monkeypatch)
    monkeypatch.setenv(hardware.ENV_CPU_BF16, "0")
    fake_probe(monkeypatch, fp32=10.0, bf16=20.0)  # even a probe favouring bf16 must not override "not native"
    precision, reason = hardware.resolve_precision(requested)
    assert precision == "32-true"
    assert "20 GFLOP/s" in reason and "10 GFLOP/s" in reason and reason.endswith("-> 32-true")


@pytest.mark.parametrize("native", ["0", "1"])
@pytest.mark.parametrize("requested", ["bf16-mixed", "32", "16-mixed", 32, "32-true"])
def test_explicit_precision_is_returned_unchanged(monkeypatch, native, requested):
    monkeypatch.setenv(hardware.ENV_CPU_BF16, native)
    calls = fake_probe(monkeypatch, fp32=10.0, bf16=40.0 if native == "1" else 0.1)
    for accelerator in ("auto", "cpu", "gpu"):
        precision, reason = hardware.resolve_precision(requested, accelerator)
        assert precision == requested and type(precision) is type(requested)
        assert "explicit" in reason
    assert calls == []  # an explicit choice measures nothing


def test_native_bf16_needs_the_probe_to_show_a_speed_up(monkeypatch):
    no_cuda(monkeypatch)
    monkeypatch.setenv(hardware.ENV_CPU_BF16, "1")
    fake_probe(monkeypatch, fp32=10.0, bf16=20.0)
    assert hardware.resolve_precision(None)[0] == "bf16-mixed"

    hardware._clear_caches()
    fake_probe(monkeypatch, fp32=10.0, bf16=8.0)
    assert hardware.resolve_precision(None)[0] == "32-true"

    hardware._clear_caches()
    fake_probe(monkeypatch, fp32=10.0, bf16=11.0)  # faster, but under the 1.2x margin
    assert hardware.resolve_precision("auto")[0] == "32-true"


def test_decision_is_made_once_per_process(monkeypatch):
    no_cuda(monkeypatch)
    monkeypatch.setenv(hardware.ENV_CPU_BF16, "1")
    calls = fake_probe(monkeypatch, fp32=10.0, bf16=20.0)
    first = hardware.resolve_precision(None)
    assert hardware.resolve_precision("auto") == first
    assert len(calls) == 1


def test_cuda_path(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv(hardware.ENV_CPU_BF16, "0")
    fake_probe(monkeypatch, fp32=10.0, bf16=0.1)
    assert hardware.resolve_precision(None)[0] == "bf16-mixed"
    assert hardware.resolve_precision(None, "cpu")[0] == "32-true"  # accelerator="cpu" ignores the GPU

    hardware._clear_caches()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.resolve_precision(None, "gpu")[0] == "32-true"


def test_matmul_rates_are_positive_finite_and_quick():
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    rates = hardware.matmul_rates(n=64, repeats=2)
    assert time.perf_counter() - t0 < 5.0
    assert set(rates) == {"fp32", "bf16"}
    assert all(math.isfinite(r) and r > 0 for r in rates.values())
    assert torch.get_num_threads() == threads  # the probe's single thread is not left behind
