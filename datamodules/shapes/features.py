"""A small feature network for FID on the shapes world (an in-project stand-in for Inception).

Inception features were learned on ImageNet photos and say little about 32x32 renders of colored
circles/squares/triangles. `ShapesFeatureNet` is instead trained to read back the renderer's
ground truth from an image:

* counts: for each of the 18 (shape, color) pairs, how many such objects (0..4, 5-way classes);
* layout: for each of the 6 colors, a 4x4 occupancy grid (cell holds >= `OCCUPANCY_MIN_PIXELS`
  pixels of exactly that color), which ties the features to positions and sizes.

Its penultimate activations (`embed`, 128-d) therefore encode shapes, colors, counts and layout.
`forward`, the FID feature, projects them onto their top principal components (32 by default,
fitted on train renders after training): FID's finite-sample bias grows with the feature
dimension, and at the few hundred images a CPU evaluation affords, 128-d features drown real
shifts in that bias (same-distribution FID 55 vs 217 for a different count distribution at
512 vs 512 images, ratio 4; with 32 PCs 27 vs 162, ratio 6). Light blur/noise/color-jitter
augmentation keeps them from being brittle to what a lossy VAE does to an image, while heavy
blur still moves them.

Make the shipped weights (2,000 steps, about 6 min on one CPU thread; deterministic for a seed):

    python -m datamodules.shapes.features --out_path datamodules/shapes/pretrained_features.pt
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .world import COLORS, SHAPES, ShapesWorld

DEFAULT_PATH = Path(__file__).with_name("pretrained_features.pt")
TRAIN_COMMAND = "python -m datamodules.shapes.features --out_path datamodules/shapes/pretrained_features.pt"
INPUT_SIZE = 32  # the net always sees 32x32 images (inputs of other sizes are resized)
MAX_COUNT = 4  # a scene holds at most 4 objects
GRID = 4  # occupancy grid side
OCCUPANCY_MIN_PIXELS = 4  # exact-color pixels (at 32x32) for a grid cell to count as occupied
N_PAIRS = len(SHAPES) * len(COLORS)  # 18 (shape, color) pairs, index = shape * 6 + color


class ShapesFeatureNet(nn.Module):
    """CNN: image -> embedding [N, embed_dim] (`embed`; `head` maps it to attribute logits)
    -> FID features [N, num_features] (`forward`: centered, projected on the top PCs).

    Architecture (32x32 input): conv(3->w) @32 -> pool -> conv(w->2w) @16 -> pool -> conv(2w->2w),
    conv(2w->2w) @8 -> pool -> 1x1 conv(2w->16) @4 -> flatten(256) -> linear -> ReLU (~150k params
    at w=32; the cheap early layers keep CPU training to a few minutes).
    The spatial 4x4 map is flattened rather than globally pooled so that features keep layout.
    """

    def __init__(self, width: int = 32, embed_dim: int = 128, num_features: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),  # 16x16
            *block(w, 2 * w), nn.MaxPool2d(2),  # 8x8
            *block(2 * w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 4x4
            *block(2 * w, 16, k=1),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(16 * 4 * 4, embed_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(embed_dim, N_PAIRS * (MAX_COUNT + 1) + len(COLORS) * GRID * GRID)
        if not 1 <= num_features <= embed_dim:
            raise ValueError(f"num_features must be in 1..embed_dim={embed_dim}, got {num_features}")
        # PCA of the embedding (set by `fit_projection`); until then the first coordinates.
        self.register_buffer("pca_mean", torch.zeros(embed_dim))
        self.register_buffer("pca_proj", torch.eye(embed_dim)[:, :num_features].clone())
        # torchmetrics' FID reads `num_features` instead of probing the net with a 299x299 image.
        self.num_features = num_features
        self.config = {"width": width, "embed_dim": embed_dim, "num_features": num_features}
        self.frozen = False

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """uint8 [N,3,H,W] (0..255) or float [N,3,H,W] in [0,1] -> float [N,3,32,32], centered."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return (x - 0.5) / 0.5

    def embed(self, images: Tensor) -> Tensor:
        """images: uint8 [N,3,H,W] or float [N,3,H,W] in [0,1] -> embedding float [N, embed_dim] (head input)."""
        return self.fc(self.body(self.preprocess(images)))

    def forward(self, images: Tensor) -> Tensor:
        """images: uint8 [N,3,H,W] or float [N,3,H,W] in [0,1] -> FID features float [N, num_features]."""
        return (self.embed(images) - self.pca_mean) @ self.pca_proj

    @torch.no_grad()
    def fit_projection(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """Set the FID projection to the top `num_features` principal components of the embeddings
        of `images` (uint8 [N,3,H,W], N >> embed_dim). Returns all eigenvalues, descending [embed_dim]."""
        emb = torch.cat([self.embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).double()
        evals, evecs = torch.linalg.eigh(torch.cov(emb.T))  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        self.pca_mean.copy_(emb.mean(0).float())
        self.pca_proj.copy_(evecs[:, : self.num_features].float())
        return evals.float()

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Decoded attributes: counts long [N, 18] (pair = shape*6 + color), occupancy bool [N, 6, 4, 4]."""
        count_logits, occ_logits = split_logits(self.head(self.embed(images)))
        return {"counts": count_logits.argmax(-1), "occupancy": occ_logits > 0}

    def freeze(self) -> ShapesFeatureNet:
        """Eval mode for good: no grads, and `train()` (e.g. Lightning's) cannot re-enable BatchNorm updates."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> ShapesFeatureNet:
        return super().train(mode and not self.frozen)


def split_logits(logits: Tensor) -> tuple[Tensor, Tensor]:
    """head output [N, 18*5 + 6*16] -> (count logits [N, 18, 5], occupancy logits [N, 6, 4, 4])."""
    n_count = N_PAIRS * (MAX_COUNT + 1)
    return (logits[:, :n_count].reshape(-1, N_PAIRS, MAX_COUNT + 1),
            logits[:, n_count:].reshape(-1, len(COLORS), GRID, GRID))


# ----------------------------------------------------------------------------- targets / data

def scene_targets(sample) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of a `Sample`: counts int64 [18], occupancy float32 [6, 4, 4].

    Occupancy is read from the rendered image: pixels exactly of a palette color are fully inside
    an object of that color (anti-aliased edges are blends), counted per grid cell.
    """
    counts = np.zeros(N_PAIRS, np.int64)
    names = list(COLORS)
    for o in sample.scene.objects:
        counts[SHAPES.index(o.shape) * len(names) + names.index(o.color)] += 1
    img = sample.image.astype(np.int16)  # [S, S, 3]
    s = img.shape[0]
    cell = s // GRID
    min_pixels = OCCUPANCY_MIN_PIXELS * (s / INPUT_SIZE) ** 2
    occ = np.zeros((len(names), GRID, GRID), np.float32)
    for c, rgb in enumerate(COLORS.values()):
        hit = (img == np.asarray(rgb, np.int16)).all(-1)[: cell * GRID, : cell * GRID]
        per_cell = hit.reshape(GRID, cell, GRID, cell).sum(axis=(1, 3))
        occ[c] = per_cell >= min_pixels
    return counts, occ


def render_dataset(world: ShapesWorld, split: str, n: int, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """n renders of `split` -> images uint8 [n,3,S,S], counts long [n,18], occupancy float [n,6,4,4]."""
    imgs, counts, occs = [], [], []
    for i in range(start, start + n):
        s = world.sample(split, i)
        c, o = scene_targets(s)
        imgs.append(s.image)
        counts.append(c)
        occs.append(o)
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.stack(counts)), torch.from_numpy(np.stack(occs))


def augment(x: Tensor, gen: torch.Generator, p: float = 0.5) -> Tensor:
    """Light, VAE-like corruptions of float images [N,3,H,W] in [0,1], each with probability p:
    Gaussian blur (sigma 0.2-0.8 px), pixel noise (std <= 0.04), per-channel gain/offset (+-4%).
    Kept mild: heavy blur must still change the features, and palette colors are > 0.5 apart."""
    n = x.shape[0]

    def pick() -> Tensor:  # [N,1,1,1] mask of samples that get this corruption
        return (torch.rand(n, 1, 1, 1, generator=gen) < p).float()

    sigma = 0.2 + 0.6 * torch.rand(n, generator=gen)
    t = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [N*3, 5]: one kernel per image channel
    h, w = x.shape[-2:]
    y = F.pad(x.reshape(1, n * 3, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=n * 3)  # vertical pass
    y = F.conv2d(y, k[:, None, None, :], groups=n * 3).reshape(n, 3, h, w)  # horizontal pass
    m = pick()
    x = m * y + (1 - m) * x
    x = x + pick() * 0.04 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    gain = 1 + 0.04 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    offset = 0.04 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    m = pick()
    x = m * (x * gain + offset) + (1 - m) * x
    return x.clamp(0, 1)


def losses(net: ShapesFeatureNet, images: Tensor, counts: Tensor, occ: Tensor) -> Tensor:
    """Cross-entropy over the 18 count classifiers + BCE over the 96 occupancy cells."""
    count_logits, occ_logits = split_logits(net.head(net.embed(images)))
    ce = F.cross_entropy(count_logits.reshape(-1, MAX_COUNT + 1), counts.reshape(-1))
    bce = F.binary_cross_entropy_with_logits(occ_logits, occ)
    return ce + bce


@torch.no_grad()
def evaluate(net: ShapesFeatureNet, images: Tensor, counts: Tensor, occ: Tensor,
             batch_size: int = 256) -> dict[str, float]:
    """Held-out accuracies: `scene_counts` = all 18 counts of an image right (the strict one),
    `pair_counts` = per-(shape,color) count, `total_count` = #objects, `occupancy` = per grid cell
    (~94% of cells are empty, so also `occupancy_iou` = |pred & true| / |pred | true| over all cells)."""
    was_training = net.training
    net.eval()
    preds_c, preds_o = [], []
    for i in range(0, len(images), batch_size):
        p = net.predict(images[i : i + batch_size])
        preds_c.append(p["counts"])
        preds_o.append(p["occupancy"])
    net.train(was_training)
    pc, po, occ = torch.cat(preds_c), torch.cat(preds_o), occ.bool()
    return {
        "scene_counts": (pc == counts).all(1).float().mean().item(),
        "pair_counts": (pc == counts).float().mean().item(),
        "total_count": (pc.sum(1) == counts.sum(1)).float().mean().item(),
        "occupancy": (po == occ).float().mean().item(),
        "occupancy_iou": ((po & occ).sum() / (po | occ).sum().clamp(min=1)).item(),
    }


# ----------------------------------------------------------------------------- train / load

def train_feature_net(
    out_path: str | None = None,
    steps: int = 2000,
    seed: int = 0,
    batch_size: int = 128,
    train_images: int = 20000,
    val_images: int = 1000,
    lr: float = 3e-3,
    width: int = 32,
    embed_dim: int = 128,
    num_features: int = 32,
    pca_images: int = 4096,
    log_every: int = 250,
) -> tuple[ShapesFeatureNet, dict[str, float]]:
    """Train on ShapesWorld(seed) "train" renders, evaluate on "val" renders, save to `out_path`.

    Args:
        out_path: where to save the weights (None: keep them in memory only).
        steps: optimizer steps.
        seed: seeds the renders, the init and the batches.
        batch_size: images per step.
        train_images: renders to train on.
        val_images: held-out renders for the reported accuracies.
        lr: peak learning rate (one-cycle schedule).
        width: conv width.
        embed_dim: embedding size.
        num_features: FID feature dims (the top principal components of the embedding).
        pca_images: train renders the FID projection is fitted on.
        log_every: steps between log lines.

    Saved file: {"state_dict", "config" (constructor kwargs), "metrics" (held-out accuracies),
    "train" (hyper-parameters)}. After training, the FID projection is fitted on the first
    `pca_images` train renders. Returns (frozen net, metrics).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    world = ShapesWorld(seed)
    t0 = time.time()
    x_tr, c_tr, o_tr = render_dataset(world, "train", train_images)
    x_va, c_va, o_va = render_dataset(world, "val", val_images)
    print(f"rendered {train_images} train + {val_images} val images in {time.time() - t0:.1f}s", flush=True)

    net = ShapesFeatureNet(width, embed_dim, num_features)
    n_params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, train_images, (batch_size,), generator=gen)
        x = augment(x_tr[idx].float() / 255.0, gen)
        loss = losses(net, x, c_tr[idx], o_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)

    net.freeze()
    metrics = evaluate(net, x_va, c_va, o_va)
    print(f"{n_params} params; held-out ({val_images} val renders) accuracy: "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    # Robustness: the same renders with every light corruption applied (blur + noise + jitter).
    corrupted = evaluate(net, augment(x_va.float() / 255.0, gen, p=1.0), c_va, o_va)
    print("held-out, all corruptions applied: " + ", ".join(f"{k} {v:.4f}" for k, v in corrupted.items()), flush=True)
    metrics.update({f"corrupted_{k}": v for k, v in corrupted.items()})
    evals = net.fit_projection(x_tr[:pca_images])
    metrics["pca_explained_variance"] = (evals[:num_features].sum() / evals.sum()).item()
    print(f"FID features: top {num_features} of {embed_dim} PCs ({pca_images} train renders), "
          f"explained variance {metrics['pca_explained_variance']:.3f}", flush=True)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "state_dict": net.state_dict(),
            "config": dict(net.config),
            "metrics": metrics,
            "train": {"steps": steps, "seed": seed, "batch_size": batch_size, "train_images": train_images, "lr": lr,
                      "pca_images": pca_images},
        }, out_path)
        print(f"saved {out_path} ({out_path.stat().st_size / 1024:.0f} KiB)", flush=True)
    return net, metrics


def load_feature_net(path: str | os.PathLike | None = None,
                     map_location: str | torch.device = "cpu") -> ShapesFeatureNet:
    """Load a trained net (default: the shipped `pretrained_features.pt` next to this module), frozen in eval mode."""
    path = Path(DEFAULT_PATH if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"shapes feature-net weights not found at {path}; create them with `{TRAIN_COMMAND}` "
                                "(run from the repository root; ~6 min on CPU)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    net = ShapesFeatureNet(**ckpt["config"])
    net.load_state_dict(ckpt["state_dict"])
    return net.freeze()


def main(argv: list[str] | None = None) -> None:
    """Command line over :func:`train_feature_net`: its arguments and defaults are the options (``--help``)."""
    from jsonargparse import auto_cli

    auto_cli(train_feature_net, args=argv)


if __name__ == "__main__":
    main()
