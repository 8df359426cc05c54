"""Optimization: λ in the dual loss, the warmup + cosine learning rate, the weight-decay groups, and activation
checkpointing. Every expected value is computed here from its definition (the closed-form schedule, the module
types of the parameters, autograd on the separate loss terms), not by calling the code under test a second time."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

import lit_transfusion.transformer as transformer_module
from lit_transfusion.batch import Image, Text, pack_rows
from lit_transfusion.module import TransfusionModule
from lit_transfusion.patching import PositionEmbedding2D
from lit_transfusion.schedule import warmup_cosine
from tests.conftest import SPECIAL

BOS, EOS = SPECIAL.bos, SPECIAL.eos


def make_module(**kw) -> TransfusionModule:
    torch.manual_seed(0)
    return TransfusionModule(vocab_size=32, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                             max_seq_len=64, **kw)


def randomize_noise_heads(module: TransfusionModule, seed: int = 0) -> TransfusionModule:
    """The noise-output layers start at zero (DiT init), which makes the image loss independent of every other
    weight; random values make the image gradients non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.model.patcher.output_layers():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def mixed_batch():
    """Two rows, several documents each: caption -> image -> text, image -> caption and text only, so text
    positions attend to patches and the hybrid mask matters."""
    g = torch.Generator().manual_seed(1)

    def lat():
        return torch.randn(4, 4, 4, generator=g)

    rows = [
        [[Text([BOS, 7, 8]), Image(lat()), Text([9, 10, EOS])], [Image(lat()), Text([11, 12, EOS])]],
        [[Text([BOS, 5, 6, 13, 14, EOS])], [Text([BOS, 15]), Image(lat()), Text([EOS])]],
    ]
    batch = pack_rows(rows, 32, 2, SPECIAL)
    return batch, torch.tensor([100, 450, 800])


def fixed_losses(module: TransfusionModule, batch, t):
    return module.losses(batch, t=t, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------------------- λ
def test_image_loss_weight_scales_the_image_term_and_its_gradient():
    """loss = loss_text + λ·loss_image for the module's own λ (a hard-coded 5 fails at λ = 2.5 and 0), and
    d loss / dθ = d loss_text / dθ + λ · d loss_image / dθ for a patcher input and output weight."""
    batch, t = mixed_batch()
    reference = randomize_noise_heads(make_module())
    results = {}
    for lam in (0.0, 2.5, 5.0):
        m = make_module(image_loss_weight=lam)
        m.load_state_dict(reference.state_dict())
        out = fixed_losses(m.train(), batch, t)
        torch.testing.assert_close(out["loss"], out["loss_text"] + lam * out["loss_image"], rtol=1e-6, atol=0)
        params = {"proj_in": m.model.patcher.proj_in.weight, "proj_out": m.model.patcher.proj_out.weight}
        grads = {}
        for name, p in params.items():
            g_text, = torch.autograd.grad(out["loss_text"], p, retain_graph=True, allow_unused=True)
            g_text = torch.zeros_like(p) if g_text is None else g_text
            g_image, = torch.autograd.grad(out["loss_image"], p, retain_graph=True)
            g_loss, = torch.autograd.grad(out["loss"], p, retain_graph=True)
            assert g_image.abs().max() > 1e-4, f"{name}: image gradient is trivial; the test would prove nothing"
            scale = float(g_loss.abs().max())  # float32 sums in another order: compare to the gradient's scale
            torch.testing.assert_close(g_loss, g_text + lam * g_image, rtol=1e-4, atol=1e-5 * scale)
            grads[name], grads[name + "/text"] = g_loss, g_text
        assert torch.count_nonzero(grads["proj_out/text"]) == 0  # the noise head reaches only the image term
        assert torch.count_nonzero(grads["proj_in/text"]) > 0  # text after an image attends to its patches
        results[lam] = (out, grads)
    # The parts do not depend on λ; the total does, by exactly Δλ · loss_image.
    (o0, g0), (o25, g25), (o5, g5) = results[0.0], results[2.5], results[5.0]
    for k in ("loss_text", "loss_image", "mse_image"):
        torch.testing.assert_close(o25[k], o5[k], rtol=0, atol=0)
    torch.testing.assert_close(o0["loss"], o0["loss_text"], rtol=0, atol=0)
    torch.testing.assert_close(o5["loss"] - o25["loss"], 2.5 * o5["loss_image"], rtol=1e-5, atol=1e-7)
    assert o5["loss_image"] > 0.01
    # proj_out's gradient is λ · (image gradient): zero at λ = 0, and doubling λ doubles it.
    assert torch.count_nonzero(g0["proj_out"]) == 0
    scale = float(g5["proj_out"].abs().max())
    torch.testing.assert_close(g5["proj_out"], 2 * g25["proj_out"], rtol=1e-4, atol=1e-5 * scale)
    assert not torch.allclose(g5["proj_in"], g25["proj_in"])


# --------------------------------------------------------------------------------------------- schedule
def closed_form_lr(step: int, lr: float, min_lr: float, warmup: int, total: float) -> float:
    """Linear warmup lr·(s+1)/w, then min_lr + (lr - min_lr)·½(1 + cos(π·p)), p = (s - w)/(total - w) capped at 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if math.isinf(total):
        return lr
    p = min((step - warmup) / (total - warmup), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))


def test_warmup_cosine_matches_the_closed_form():
    f = warmup_cosine(5, 25, 0.1)  # factors of the peak: lr = 1, min_lr = 0.1
    for s in range(40):
        assert f(s) == pytest.approx(closed_form_lr(s, 1.0, 0.1, 5, 25), rel=1e-12), s
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # (s+1)/w, never 0
    assert f(5) == pytest.approx(1.0) and f(15) == pytest.approx(0.55) and f(25) == pytest.approx(0.1)
    assert f(1000) == pytest.approx(0.1)  # stays at the floor after the end
    no_end = warmup_cosine(4, math.inf, 0.1)  # a run bounded only by time: the peak after warmup
    assert [no_end(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(no_end(s) == 1.0 for s in (4, 100, 10**9))
    no_warmup = warmup_cosine(0, 10, 0.0)
    assert no_warmup(0) == pytest.approx(1.0) and no_warmup(5) == pytest.approx(0.5) and no_warmup(10) == 0.0


def attach_fake_trainer(module: TransfusionModule, steps: int, precision: str = "32-true") -> TransfusionModule:
    """What ``configure_optimizers`` reads of a Trainer (no Timer callback: no time budget)."""
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps, precision=precision, callbacks=[],
                                     global_step=0, global_rank=0, world_size=1)
    return module


def test_module_lr_is_warmup_then_cosine_to_min_lr_per_step():
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 100
    m = attach_fake_trainer(make_module(lr=lr, min_lr=min_lr, warmup_steps=warmup), total)
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(total + 20):
        group_lrs = {g["lr"] for g in opt.param_groups}
        assert len(group_lrs) == 1, "every parameter group follows the same schedule"
        seen.append(group_lrs.pop())
        opt.step()  # no gradients: a no-op, but keeps LambdaLR's order check quiet
        sched.step()
    expected = [closed_form_lr(s, lr, min_lr, warmup, total) for s in range(total + 20)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert seen[0] == pytest.approx(lr / warmup) and seen[warmup - 1] == pytest.approx(lr)
    assert seen[55] == pytest.approx((lr + min_lr) / 2)  # half-way through the cosine
    assert seen[total] == pytest.approx(min_lr) and seen[-1] == pytest.approx(min_lr)


def test_lr_under_a_real_trainer_steps_once_per_optimizer_step():
    """Lightning steps the scheduler once per optimizer step over max_steps (estimated_stepping_batches)."""
    lr, min_lr, warmup, total = 1e-3, 1e-4, 2, 6
    batch, _ = mixed_batch()
    m = make_module(lr=lr, min_lr=min_lr, warmup_steps=warmup)
    seen = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=total, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RecordLR()])
    loader = torch.utils.data.DataLoader([batch] * (2 * total), batch_size=None)
    trainer.fit(m, train_dataloaders=loader)
    assert seen == pytest.approx([closed_form_lr(s, lr, min_lr, warmup, total) for s in range(total)], rel=1e-9)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(min_lr)  # the schedule ran to its end


# ----------------------------------------------------------------------------------------- weight decay
NORMS = (nn.RMSNorm, nn.GroupNorm, nn.LayerNorm)
MATRICES = (nn.Linear, nn.Conv2d, nn.Embedding)


def expected_decay_split(module: nn.Module) -> tuple[set[str], set[str]]:
    """(decayed, not decayed) parameter names, classified by the module that owns each parameter:
    linear / conv / embedding weights and the learned 2-D position tables decay; norm weights and biases don't.
    A parameter of any other kind fails the test, so a new kind gets a decision here."""
    decay, no_decay = set(), set()
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or isinstance(mod, NORMS):
                no_decay.add(name)
            elif p_name == "weight" and isinstance(mod, MATRICES):
                decay.add(name)
            elif isinstance(mod, PositionEmbedding2D):
                # [gh, 1, D] / [1, gw, D] row and column tables: decayed like the token embedding (a choice; minGPT
                # and timm's ViT exempt position embeddings, nanoGPT decays them).
                decay.add(name)
            else:
                raise AssertionError(f"unclassified parameter {name} of {type(mod).__name__}")
    return decay, no_decay


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_weight_decay_on_matrices_and_embeddings_only(patcher):
    m = attach_fake_trainer(make_module(patcher=patcher, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-7), 100)
    decay, no_decay = expected_decay_split(m)
    names = dict(m.named_parameters())
    # The name patterns agree with the classification by module type.
    assert {n for n in names if n.endswith(("norm.weight", ".bias"))} <= no_decay
    assert {"model.embed.weight", "model.lm_head.weight", "model.transformer.blocks.0.attn.wqkv.weight",
            "model.patcher.proj_in.weight" if patcher == "linear" else "model.patcher.conv_in.weight",
            "model.patcher.pos.row", "model.patcher.pos.col"} <= decay
    assert any(n.endswith("norm.weight") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)

    opt = m.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    by_id = {id(p): n for n, p in names.items()}
    grouped = {0.1: [], 0.0: []}
    for group in opt.param_groups:
        assert group["weight_decay"] in grouped, group["weight_decay"]
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-7
        grouped[group["weight_decay"]] += [by_id[id(p)] for p in group["params"]]
    in_groups = grouped[0.1] + grouped[0.0]
    assert len(in_groups) == len(set(in_groups)), "a parameter is in two groups"
    assert set(in_groups) == {n for n, p in names.items() if p.requires_grad}
    assert set(grouped[0.1]) == decay, (sorted(set(grouped[0.1]) ^ decay))
    assert set(grouped[0.0]) == no_decay, (sorted(set(grouped[0.0]) ^ no_decay))


# ------------------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_changes_memory_not_results(monkeypatch):
    """Same weights, same batch, train mode: the checkpointed model recomputes every block (one checkpoint call
    per layer) and gives the same loss and the same gradient for every parameter."""
    calls = []
    real_checkpoint = transformer_module.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(transformer_module, "checkpoint", counting_checkpoint)
    batch, t = mixed_batch()
    plain = randomize_noise_heads(make_module()).train()
    ckpt = make_module(activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    results = []
    for m in (plain, ckpt):
        calls.clear()
        out = fixed_losses(m, batch, t)
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}, list(calls)))
    (out_p, grad_p, calls_p), (out_c, grad_c, calls_c) = results
    assert calls_p == [] and calls_c == list(ckpt.model.transformer.blocks)
    for k in ("loss", "loss_text", "loss_image"):
        torch.testing.assert_close(out_c[k], out_p[k], rtol=0, atol=1e-6)
    assert set(grad_c) == set(grad_p)
    for name in grad_p:
        torch.testing.assert_close(grad_c[name], grad_p[name], rtol=1e-5, atol=1e-6, msg=name)
    # eval mode (generation) does not checkpoint
    calls.clear()
    with torch.no_grad():
        fixed_losses(ckpt.eval(), batch, t)
    assert calls == []


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_every_parameter_gets_a_gradient_from_text_only_and_image_only_batches(patcher):
    """DDP refuses a step in which a parameter took no part; with mixed data a batch of text documents only (or
    of image documents without a caption target) is an ordinary event. Every parameter must get a gradient,
    and a zero one where the batch does not involve it."""
    module = make_module(patcher=patcher)
    text_only = pack_rows([[[Text([BOS, 7, 8, EOS])]]], 16, 2, SPECIAL)
    image_only = pack_rows([[[Text([BOS], loss=False), Image(torch.randn(4, 4, 4))]]], 16, 2, SPECIAL)
    for batch, unused in ((text_only, "patcher."), (image_only, "lm_head.")):
        module.zero_grad(set_to_none=True)
        module.losses(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
        missing = [n for n, p in module.named_parameters() if p.grad is None]
        assert not missing, missing
        touched = [n for n, p in module.named_parameters() if n.startswith(f"model.{unused}") and p.grad.abs().sum()]
        assert not touched, touched
