"""Where does a model's image prediction come from: the transformer (and through it the caption), or the patcher's
own skip path? A diagnosis of why the U-Net patcher's ``val/cond_gap`` stays small.

    python benchmarks/unet_diagnosis.py --ckpt '[runs/a/version_0/checkpoints/last.ckpt, ...]'
    python benchmarks/unet_diagnosis.py --train_steps 700 --size tiny [--patchers [linear,unet]] [--save_dir runs/diag]
        [--timesteps [100,250,500,750,900]] [--pairs 256] [--out results/unet_diagnosis/diagnosis.json]

Models come from ``fit`` checkpoints (``--ckpt``, loaded with ``commands.load.load_run``; the run's ``config.yaml``
rebuilds its datamodule) or are trained here first (``--train_steps``: ``fit`` of ``--config`` with the model's
size and patcher, ``max_time`` off so both patchers get the same schedule, no validation; the run directories go
to ``--save_dir``, a temporary directory by default, and can be diagnosed again later with ``--ckpt``).

Every number is measured in fp32 on the held-out caption -> image pairs of ``val/cond_gap`` (true caption vs another
image's caption, the same images and the same noise), at each timestep t of ``--timesteps`` (all images at that t;
the noise of pair batch b at the k-th timestep is seeded ``1000 b + k`` as in ``LatentDiffusion.cond_gap``). "The
prediction" is the image head's output (ε for the paper's objective), its MSE is against the objective's target
(unweighted: Min-SNR weights are one constant per t), norms are L2 over all pairs. ``hidden`` is the transformer's
output at the patch positions, the ``[N, P, D]`` tensor ``patcher.decode`` receives; "path" and "skip" are the two
halves of the input of each U-Net up ResBlock (the concatenation: channels from the transformer side, then the
matching down block's skip feature). Nothing in the library is changed: ``patcher.decode`` is wrapped for the
duration of a forward to record (and for gradients, tap) its inputs, and ablations call ``decode`` directly.

Per model and t (JSON ``models[i].by_t[j]``; the table prints the main ones):

- ``cond_gap``: (mean MSE shuffled - mean MSE true) / mean MSE shuffled at this t alone; ``val/cond_gap`` is the mean
  of it over t in {250, 500, 750}. ``mse``: ``true``, ``shuffled``, ``zero``, ``swap`` (ablations below).
- ``zero_ablation``: ``hidden`` replaced by zeros (the skips kept). ``change`` = ||pred - pred_zero|| / ||pred||: the
  share of the prediction the transformer path carries (linear patcher: everything but proj_out's bias, so ~1;
  U-Net: small means the up path answers from the skips alone). ``mse_increase`` (and ``_rel``, / mse true): what
  the transformer path is worth to the loss.
- ``swap_ablation``: ``hidden`` replaced by that of the shuffled caption, the true caption's skips kept. The skips
  never see the caption, so this *is* the shuffled-caption prediction (a test checks it); ``change`` =
  ||pred - pred_swap|| / ||pred||, the caption's share of the prediction.
- ``caption_change``: ||x_true - x_shuffled|| / ||x_true|| along the way from caption to prediction: ``hidden``,
  each up block's ``path`` half (U-Net), and the prediction (``eps``, = swap change). Where it collapses is where
  the caption is lost. ``caption_share`` = swap change / zero change: of what the transformer path contributes,
  the part that depends on the caption.
- ``rms``: RMS of ``patches`` (the encoder's patch vectors, the transformer's input), ``hidden`` (the decoder's
  input: for the linear patcher the whole decode input), and per U-Net up block of the ``path`` and ``skip`` halves
  (``ratio`` = path / skip).
- ``grad`` (of the mean image MSE over all pairs): ``hidden`` (||dL/d hidden||, the gradient the transformer
  receives through decode), ``skips`` (||dL/d skip|| of each skip as a decode input, i.e. only the direct path),
  per up block ``path`` / ``skip`` (gradient at the two halves of the concatenation, ``ratio`` = path / skip), and
  ``params``: the gradient norm of the ``transformer``'s parameters, the token ``embed``'s, the ``patcher``'s, and of
  each patcher submodule (``patcher.down``, ``patcher.up``, ...); ``transformer_over_patcher`` is their ratio.
- per model, ``weight_ratio`` (U-Net): per up block, the norm of the weights reading the path half over those reading
  the skip half, for ``conv1`` (after ``norm1``: its per-channel scale is folded in) and for the 1x1 ``shortcut``.

How to read it (compare the U-Net's numbers with the linear patcher's at the same t and steps):

- **drowned**: the path is small next to the skip where they meet: ``rms.up[0].ratio`` << 1. ``norm1`` normalizes
  each half separately (with an even ``unet_channels`` no GroupNorm group straddles them), so the magnitude only
  matters in the raw 1x1 ``shortcut``; there, ``rms`` ratio x ``weight_ratio.shortcut`` << 1 means the path hardly
  reaches the output.
- **starved**: little gradient reaches the transformer: ``grad.hidden`` (and ``grad.params.transformer``) much
  smaller than the linear model's; then the transformer has no reason to encode the caption, and
  ``caption_change.hidden`` is small as well. ``grad.up[0].ratio`` << 1 puts the cause at the concatenation (the
  skip already solves denoising); a healthy ``grad.up[0].path`` with a small ``grad.hidden`` puts it in
  ``from_model`` (small weights shrink the gradient on its way back).
- **bypassed**: the transformer's output does depend on the caption (``caption_change.hidden`` comparable to the
  linear model's) but the up path ignores its channels: small ``zero_ablation.change`` / ``mse_increase``,
  ``caption_change`` shrinking from ``hidden`` to ``up[k].path`` to ``eps``, ``weight_ratio`` << 1.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from torch import Tensor  # noqa: E402

from lit_transfusion.batch import CaptionPairs, SpecialIds, pack_pairs  # noqa: E402
from lit_transfusion.cond_gap import cond_gap  # noqa: E402
from lit_transfusion.hardware import machine  # noqa: E402

TIMESTEPS = (100, 250, 500, 750, 900)
PAIRS_PER_BATCH = 64  # as the datamodules' cond-gap loader


# --------------------------------------------------------------------------------------------- one forward
@dataclass
class Tap:
    """What one forward handed to the patcher: its patch vectors, the decoder's inputs, the up blocks' inputs."""

    patches: Tensor | None = None  # [N, P, D] encoder output
    hidden: Tensor | None = None  # [N, P, D] transformer output at patch positions (decode's input)
    state: list[Tensor] | None = None  # the skips as decode received them (None for the linear patcher)
    up: list[Tensor] = field(default_factory=list)  # input of each up ResBlock (path ++ skip channels)


def up_blocks(patcher) -> list[ResnetBlock2D]:
    """The U-Net's up ResBlocks in the order they run (none for the linear patcher)."""
    return [m for m in getattr(patcher, "up", []) if isinstance(m, ResnetBlock2D)]


@contextlib.contextmanager
def tapped(patcher, grad: bool = False):
    """Within the block, every ``patcher.encode`` / ``patcher.decode`` of a forward records into the yielded
    :class:`Tap`. ``grad``: keep the gradients of ``hidden``, of each skip *as a decode input* (a view made for
    decode, so its gradient is the direct path only) and of the up blocks' inputs."""
    tap = Tap()
    encode, decode = patcher.encode, patcher.decode

    def tapped_encode(latents, t):
        patches, state = encode(latents, t)
        tap.patches = patches
        return patches, state

    def tapped_decode(hidden, state, t):
        if state is not None:
            state = [s.view_as(s) for s in state]
        if grad:
            for x in [hidden, *(state or [])]:
                if x.requires_grad:
                    x.retain_grad()
        tap.hidden, tap.state = hidden, state
        return decode(hidden, state, t)

    def record_up(module, args):
        x = args[0]
        if grad and x.requires_grad:
            x.retain_grad()
        tap.up.append(x)

    hooks = [block.register_forward_pre_hook(record_up) for block in up_blocks(patcher)]
    patcher.encode, patcher.decode = tapped_encode, tapped_decode  # instance attributes shadow the methods
    try:
        yield tap
    finally:
        del patcher.encode, patcher.decode
        for h in hooks:
            h.remove()


@dataclass
class Passes:
    """One pair batch at one t: predictions [N, C, h, w] of the full model and of the ablations, what the patcher saw
    (``Tap``) under both captions, the per-image MSEs [N] and, with the true caption, the gradients of the loss."""

    target: Tensor
    eps: Tensor  # true caption
    eps_shuffled: Tensor  # shuffled caption
    eps_zero: Tensor  # true caption, hidden zeroed
    eps_swap: Tensor  # true caption's skips, shuffled caption's hidden
    mse: dict[str, Tensor]  # true / shuffled / zero / swap -> [N]
    tap: Tap  # true caption (tensors detached; gradients below)
    tap_shuffled: Tap
    grad_hidden: Tensor
    grad_skips: list[Tensor]
    grad_up: list[Tensor]


def noised(module, pairs: CaptionPairs, step: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(noisy latents, target, t) of the pairs' images at timestep ``step``, drawn as ``LatentDiffusion.losses`` draws
    them with a generator seeded ``seed`` (so ``LatentDiffusion.cond_gap`` draws the same noise)."""
    if not torch.equal(pairs.true.latents, pairs.shuffled.latents):
        raise ValueError("caption pairs must hold the same images in the same order in both batches")
    diffusion = module.representation.diffusion
    latents = pairs.true.latents.to(module.dtype)
    t = torch.full((pairs.true.num_images,), step, dtype=torch.long, device=module.device)
    g = torch.Generator(device=module.device).manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
    return diffusion.add_noise(latents, noise, t), diffusion.target(latents, noise, t), t


def mse_per_image(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def passes(module, pairs: CaptionPairs, step: int, seed: int, loss_scale: float = 1.0) -> Passes:
    """Run ``pairs`` at timestep ``step`` through ``module`` (a ``TransfusionModule``) with both captions, backpropagate
    ``loss_scale`` x the sum of the true caption's per-image MSEs (parameter gradients *accumulate* in ``.grad``), and
    decode the ablations."""
    patcher = module.model.patcher
    if patcher is None:
        raise ValueError("the diagnosis needs a model with a patcher (a TransfusionModule)")
    pairs = pairs.to(module.device)
    noisy, target, t = noised(module, pairs, step, seed)
    with torch.no_grad(), tapped(patcher) as tap_shuffled:
        eps_shuffled = module(pairs.shuffled, noisy, t).eps
    with torch.enable_grad(), tapped(patcher, grad=True) as tap:
        eps = module(pairs.true, noisy, t).eps
        mse_true = mse_per_image(eps, target)
        (mse_true.sum() * loss_scale).backward()
    with torch.no_grad():
        state = [s.detach() for s in tap.state] if tap.state is not None else None
        hidden = tap.hidden.detach()
        eps_zero = patcher.decode(torch.zeros_like(hidden), state, t)
        eps_swap = patcher.decode(tap_shuffled.hidden, state, t)
    grad_up = [x.grad for x in tap.up]
    grad_skips = [s.grad for s in tap.state] if tap.state is not None else []
    grad_hidden = tap.hidden.grad
    detached = Tap(tap.patches.detach(), hidden, state, [x.detach() for x in tap.up])
    eps = eps.detach()
    mse = {"true": mse_true.detach(), "shuffled": mse_per_image(eps_shuffled, target),
           "zero": mse_per_image(eps_zero, target), "swap": mse_per_image(eps_swap, target)}
    return Passes(target, eps, eps_shuffled, eps_zero, eps_swap, mse, detached, tap_shuffled, grad_hidden,
                  grad_skips, grad_up)


# --------------------------------------------------------------------------------------------- aggregation
def ss(x: Tensor) -> float:
    """Sum of squares (float64)."""
    return float(x.double().pow(2).sum())


def halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """An up block's input [N, 2c, H, W] -> (path [N, c, H, W], skip [N, c, H, W])."""
    return x.chunk(2, dim=1)


def param_groups(net) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters whose image-loss gradient is reported: transformer, token embedding, patcher, patcher parts."""
    groups = {"transformer": list(net.transformer.parameters()), "embed": list(net.embed.parameters()),
              "patcher": list(net.patcher.parameters())}
    for name, child in net.patcher.named_children():
        params = list(child.parameters())
        if params:
            groups[f"patcher.{name}"] = params
    return groups


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    return math.sqrt(sum(ss(p.grad) for p in params if p.grad is not None))


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def measure_t(module, batches: list[CaptionPairs], step: int, level: int) -> tuple[dict, Tensor]:
    """The numbers of one timestep over all pair batches (see the module docstring), and the cond-gap terms [n, 2]
    (per pair: MSE with the true, with the shuffled caption)."""
    net = module.model
    module.zero_grad(set_to_none=True)
    n_total = sum(p.true.num_images for p in batches)
    acc: dict[str, float] = defaultdict(float)
    mse: dict[str, list[Tensor]] = defaultdict(list)
    n_up, n_skips = len(up_blocks(net.patcher)), 0
    for batch_idx, pairs in enumerate(batches):
        p = passes(module, pairs, step, seed=1000 * batch_idx + level, loss_scale=1.0 / n_total)
        for k, v in p.mse.items():
            mse[k].append(v.cpu())
        acc["eps"] += ss(p.eps)
        acc["eps-zero"] += ss(p.eps - p.eps_zero)
        acc["eps-swap"] += ss(p.eps - p.eps_swap)
        acc["eps-shuffled"] += ss(p.eps - p.eps_shuffled)
        acc["hidden"] += ss(p.tap.hidden)
        acc["hidden.n"] += p.tap.hidden.numel()
        acc["hidden-shuffled"] += ss(p.tap.hidden - p.tap_shuffled.hidden)
        acc["patches"] += ss(p.tap.patches)
        acc["patches.n"] += p.tap.patches.numel()
        acc["grad.hidden"] += ss(p.grad_hidden)
        n_skips = len(p.grad_skips)
        for k, g in enumerate(p.grad_skips):
            acc[f"grad.skip{k}"] += ss(g)
        for k in range(n_up):
            path, skip = halves(p.tap.up[k])
            path_shuffled, _ = halves(p.tap_shuffled.up[k])
            grad_path, grad_skip = halves(p.grad_up[k])
            acc[f"up{k}.path"] += ss(path)
            acc[f"up{k}.skip"] += ss(skip)
            acc[f"up{k}.n"] += path.numel()
            acc[f"up{k}.path-shuffled"] += ss(path - path_shuffled)
            acc[f"up{k}.grad.path"] += ss(grad_path)
            acc[f"up{k}.grad.skip"] += ss(grad_skip)
    mse_t = {k: torch.cat(v) for k, v in mse.items()}
    terms = torch.stack([mse_t["true"], mse_t["shuffled"]], dim=-1)  # [n, 2]
    means = {k: float(v.double().mean()) for k, v in mse_t.items()}
    rel = lambda a, b: math.sqrt(ratio(acc[a], acc[b]))
    rms = lambda a, n: math.sqrt(ratio(acc[a], acc[n]))
    zero_change, swap_change = rel("eps-zero", "eps"), rel("eps-swap", "eps")
    up_rms, up_grad, up_caption = [], [], []
    for k in range(n_up):
        path, skip = rms(f"up{k}.path", f"up{k}.n"), rms(f"up{k}.skip", f"up{k}.n")
        up_rms.append({"path": path, "skip": skip, "ratio": ratio(path, skip)})
        g_path, g_skip = math.sqrt(acc[f"up{k}.grad.path"]), math.sqrt(acc[f"up{k}.grad.skip"])
        up_grad.append({"path": g_path, "skip": g_skip, "ratio": ratio(g_path, g_skip)})
        up_caption.append(rel(f"up{k}.path-shuffled", f"up{k}.path"))
    params = {name: grad_norm(ps) for name, ps in param_groups(net).items()}
    skips = [math.sqrt(acc[f"grad.skip{k}"]) for k in range(n_skips)]
    result = {
        "t": step,
        "cond_gap": cond_gap(terms[:, None, :]),
        "mse": means,
        "zero_ablation": {"change": zero_change, "mse_increase": means["zero"] - means["true"],
                          "mse_increase_rel": ratio(means["zero"] - means["true"], means["true"])},
        "swap_ablation": {"change": swap_change, "mse_increase": means["swap"] - means["true"],
                          "mse_increase_rel": ratio(means["swap"] - means["true"], means["true"])},
        "caption_change": {"hidden": rel("hidden-shuffled", "hidden"), "up_path": up_caption,
                           "eps": rel("eps-shuffled", "eps")},
        "caption_share": ratio(swap_change, zero_change),
        "rms": {"patches": rms("patches", "patches.n"), "hidden": rms("hidden", "hidden.n"), "up": up_rms},
        "grad": {"hidden": math.sqrt(acc["grad.hidden"]), "skips": skips, "up": up_grad, "params": params,
                 "transformer_over_patcher": ratio(params["transformer"], params["patcher"])},
    }
    module.zero_grad(set_to_none=True)
    return result, terms


@torch.no_grad()
def weight_ratios(patcher) -> list[dict[str, float]]:
    """Per U-Net up block: ||weights reading the path half|| / ||weights reading the skip half|| of ``conv1`` (times
    ``norm1``'s per-channel scale) and of the 1x1 ``shortcut``."""
    out = []
    for block in up_blocks(patcher):
        c = block.in_channels // 2
        conv1 = block.conv1.weight.double().pow(2).sum((0, 2, 3)) * block.norm1.weight.double().pow(2)  # [2c]
        row = {"conv1": math.sqrt(ratio(float(conv1[:c].sum()), float(conv1[c:].sum())))}
        if block.conv_shortcut is not None:
            short = block.conv_shortcut.weight.double().pow(2).sum((0, 2, 3))
            row["shortcut"] = math.sqrt(ratio(float(short[:c].sum()), float(short[c:].sum())))
        out.append(row)
    return out


def diagnose(module, batches: list[CaptionPairs], timesteps=TIMESTEPS) -> dict:
    """Every number of one model (a ``TransfusionModule``) on ``batches`` of caption pairs: ``by_t`` (one dict per
    timestep, see the module docstring), ``weight_ratio``, ``pairs`` and the parameter counts."""
    net = module.model
    was_training = module.training
    module.eval()
    try:
        by_t = [measure_t(module, batches, int(step), level)[0] for level, step in enumerate(timesteps)]
    finally:
        module.train(was_training)
    return {"patcher": net.cfg.patcher, "pairs": sum(p.true.num_images for p in batches),
            "params": {name: sum(p.numel() for p in ps) for name, ps in param_groups(net).items()},
            "weight_ratio": weight_ratios(net.patcher), "by_t": by_t}


# --------------------------------------------------------------------------------------------- models and data
def pair_batches(module, dm, split: str, pairs: int | None) -> list[CaptionPairs]:
    """The datamodule's cond-gap pairs of ``split`` (the first ``pairs``), packed 64 per batch as its loader packs."""
    docs = dm.cond_gap_pairs(split)[:pairs]
    if not docs:
        raise ValueError(f"the datamodule has no caption pairs in split {split!r}")
    special = SpecialIds(**module.special)
    patch = module.config.patch_size
    return [pack_pairs(docs[i:i + PAIRS_PER_BATCH], patch, special) for i in range(0, len(docs), PAIRS_PER_BATCH)]


def load(ckpt: str) -> tuple[object, object, int | None]:
    """(module in fp32 eval mode, its run's datamodule set up, the checkpoint's global step) of a ``fit``
    checkpoint."""
    from lit_transfusion.commands.load import is_export, load_run

    if is_export(ckpt):
        raise ValueError(f"{ckpt}: an export directory has no datamodule config; give the run's last.ckpt")
    module = load_run(ckpt)[0].float()
    config = yaml.safe_load((Path(ckpt).resolve().parent.parent / "config.yaml").read_text())
    owner, _, name = config["data"]["class_path"].rpartition(".")
    init_args = dict(config["data"].get("init_args") or {})
    init_args["patch_size"] = module.hparams.patch_size
    dm = getattr(importlib.import_module(owner), name)(**init_args)
    dm.setup("validate")
    step = None
    if Path(ckpt).is_file():
        step = torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step")
    return module, dm, step


def train(config: str, size: str, patcher: str, steps: int, save_dir: Path, precision: str | None,
          overrides: list[str]) -> str:
    """``fit`` ``config`` with this size and patcher for ``steps`` steps (no time budget, no validation) into
    ``save_dir``; returns the path of its last.ckpt."""
    from lit_transfusion.commands.cli import build_cli

    args = ["fit", "--config", config, f"--model.init_args.size={size}", f"--model.init_args.patcher={patcher}",
            f"--trainer.max_steps={steps}", "--trainer.max_time=null", "--trainer.limit_val_batches=0",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.logger.init_args.name=diagnosis-{size}-{patcher}", "--trainer.enable_progress_bar=false"]
    if precision is not None:
        args.append(f"--trainer.precision={precision}")
    print(f"training the {patcher} patcher ({size}) for {steps} steps into {save_dir}", flush=True)
    cli = build_cli([*args, *overrides])
    path = cli.trainer.checkpoint_callback.last_model_path
    if not path:
        raise RuntimeError(f"the {patcher} run wrote no last.ckpt (its config needs a checkpoint callback)")
    return path


# --------------------------------------------------------------------------------------------- report
def run_label(ckpt: str) -> str:
    """``<run name>/<version>`` of a checkpoint in ``<save_dir>/<name>/<version>/checkpoints/``."""
    run = Path(ckpt).resolve().parent.parent
    return f"{run.parent.name}/{run.name}"


def finite(x):
    """``x`` with every NaN float replaced by None (strict JSON)."""
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def fmt(x: float, spec: str = ".4f") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_tables(models: list[dict]) -> None:
    """The main numbers of every model and t, then the U-Net up blocks' (JSON keys in the legend lines)."""
    w = max([5, *(len(m["name"]) for m in models)])
    print("\nAll models. zero chg / dMSE: zero_ablation.change / .mse_increase_rel; cap chg: swap_ablation.change;"
          "\ncap/zero: caption_share; cap hid: caption_change.hidden; rms hid: rms.hidden; |g hid|: grad.hidden;"
          "\ng tf/pt: grad.transformer_over_patcher")
    head = (f"{'model':<{w}} {'t':>4} {'cond_gap':>9} {'mse':>8} {'zero chg':>9} {'zero dMSE':>10} {'cap chg':>8} "
            f"{'cap/zero':>8} {'cap hid':>8} {'rms hid':>8} {'|g hid|':>9} {'g tf/pt':>8}")
    print(head)
    print("-" * len(head))
    for m in models:
        for r in m["by_t"]:
            print(f"{m['name']:<{w}} {r['t']:>4} {fmt(r['cond_gap'], '+.4f'):>9} {fmt(r['mse']['true']):>8} "
                  f"{fmt(r['zero_ablation']['change']):>9} {fmt(r['zero_ablation']['mse_increase_rel'], '+.3f'):>10} "
                  f"{fmt(r['swap_ablation']['change']):>8} {fmt(r['caption_share'], '.3f'):>8} "
                  f"{fmt(r['caption_change']['hidden']):>8} {fmt(r['rms']['hidden'], '.3f'):>8} "
                  f"{fmt(r['grad']['hidden'], '.2e'):>9} {fmt(r['grad']['transformer_over_patcher'], '.3f'):>8}")
    unets = [m for m in models if m["by_t"] and m["by_t"][0]["rms"]["up"]]
    if not unets:
        return
    print("\nU-Net up blocks (path = transformer side, skip = down-block feature; ratios path / skip). cap path:"
          "\ncaption_change.up_path; |g skip|: grad.skips of the block's skip; w conv1 / short: weight_ratio")
    head = (f"{'model':<{w}} {'t':>4} {'blk':>3} {'rms path':>9} {'rms skip':>9} {'rms p/s':>8} {'grad p/s':>9} "
            f"{'cap path':>9} {'|g skip|':>9} {'w conv1':>8} {'w short':>8}")
    print(head)
    print("-" * len(head))
    for m in unets:
        for r in m["by_t"]:
            for k, (rms, grad) in enumerate(zip(r["rms"]["up"], r["grad"]["up"], strict=True)):
                weights = m["weight_ratio"][k]
                skip_grad = r["grad"]["skips"][len(r["grad"]["skips"]) - 1 - k]  # up block k takes the k-th last skip
                print(f"{m['name']:<{w}} {r['t']:>4} {k:>3} {fmt(rms['path'], '.3f'):>9} {fmt(rms['skip'], '.3f'):>9} "
                      f"{fmt(rms['ratio'], '.3f'):>8} {fmt(grad['ratio'], '.3f'):>9} "
                      f"{fmt(r['caption_change']['up_path'][k]):>9} {fmt(skip_grad, '.2e'):>9} "
                      f"{fmt(weights['conv1'], '.3f'):>8} {fmt(weights.get('shortcut', float('nan')), '.3f'):>8}")


def main(ckpt: list[str] | None = None, train_steps: int | None = None, size: str = "tiny",
         patchers: list[Literal["linear", "unet"]] | None = None, config: str = "configs/shapes/tiny.yaml",
         precision: Literal[32, "bf16-mixed", "16-mixed"] | None = None, override: list[str] | None = None,
         save_dir: str | None = None, timesteps: list[int] | None = None, pairs: int | None = None,
         split: str = "val", threads: int | None = None,
         out: str = "results/unet_diagnosis/diagnosis.json") -> dict:
    """Where a model's image prediction comes from: ablations, magnitudes and gradients at the patcher.

    Args:
        ckpt: ``fit`` checkpoints (last.ckpt of runs of a configs/shapes/tiny.yaml-style config) to diagnose
        train_steps: instead of (or besides) --ckpt, train one model per patcher for this many steps first
        size: the model size of the trained models (nano, micro, tiny, ...)
        patchers: the patchers to train (default [linear,unet])
        config: the training config of the trained models
        precision: trainer precision of the trained models (default: the config's, i.e. bf16-mixed where native)
        override: further training CLI arguments, one per --override+=..., e.g.
            --override+=--data.init_args.num_train=64
        save_dir: where the trained runs go (default: a temporary directory, deleted at the end)
        timesteps: the diffusion timesteps measured (default [100,250,500,750,900])
        pairs: use the first this many caption pairs (default: all the datamodule's cond-gap pairs)
        split: the split of the caption pairs
        threads: torch intra-op threads (default: torch's)
        out: the JSON file written
    """
    if not ckpt and not train_steps:
        raise ValueError("give --ckpt and/or --train_steps")
    if threads:
        torch.set_num_threads(threads)
    timesteps = list(timesteps or TIMESTEPS)
    # (label, checkpoint, whether the checkpoint outlives this run)
    sources = [(run_label(c), c, True) for c in ckpt or []]
    models = []
    with contextlib.ExitStack() as stack:
        if train_steps:
            root = Path(save_dir) if save_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            for patcher in patchers or ["linear", "unet"]:
                path = train(config, size, patcher, train_steps, root, None if precision is None else str(precision),
                             list(override or []))
                sources.append((run_label(path) if save_dir else f"trained-{size}-{train_steps}", path,
                                bool(save_dir)))
        for label, path, kept in sources:
            module, dm, step = load(path)
            batches = pair_batches(module, dm, split, pairs)
            result = diagnose(module, batches, timesteps)
            name = f"{result['patcher']}:{label}"
            models.append({"name": name, "ckpt": str(path) if kept else None, "step": step,
                           "size": module.hparams.size, **result})
            print(f"{name}: step {step}, {result['pairs']} pairs, t {timesteps}", flush=True)
    print_tables(models)
    trained = {"train_steps": train_steps, "size": size, "patchers": patchers or ["linear", "unet"], "config": config,
               "precision": None if precision is None else str(precision), "override": override,
               "save_dir": save_dir} if train_steps else None
    report = {"settings": {"ckpt": ckpt, "trained": trained, "timesteps": timesteps, "pairs": pairs, "split": split,
                           "dtype": "float32", "threads": torch.get_num_threads()},
              "machine": machine(), "models": models}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(finite(report), indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    from jsonargparse import ArgumentParser

    # Not auto_cli: it adds its own --config (a file of option values) and drops a function's ``config`` argument.
    parser = ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_function_arguments(main, as_group=False)
    main(**parser.parse_args().as_dict())
