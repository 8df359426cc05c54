"""The end-of-run report: what was written per source and split, where validation comes from, what was skipped
and why, and what the VAE check found."""

from __future__ import annotations

from datamodules.files.schema import Manifest, SourceInfo

# What trains a VAE on the user's own images (named when the configured VAE reconstructs them badly).
VAE_CONFIG = "configs/imagefolder/vae.yaml"


def counts(values: dict[str, int]) -> str:
    """``"reason n, ..."`` of the non-zero counts, by reason."""
    return ", ".join(f"{k} {v}" for k, v in sorted(values.items()) if v)


def report(manifest: Manifest, seconds: float, vae_min_psnr: float = 25.0) -> str:
    """The end-of-run report: samples written per source and split, where validation comes from, skips by
    reason with examples, the VAE's reconstruction PSNR (a warning below ``vae_min_psnr``), and a warning when no
    source has a validation split (``fit`` refuses such a directory)."""
    lines = [f"prepared in {seconds:.1f} s:"]
    for name, info in manifest.sources.items():
        splits = ", ".join(f"{split} {s.samples} samples ({s.images} images, {s.tokens} tokens)"
                           for split, s in info.splits.items()) or "nothing written"
        lines.append(f"  {name} [{info.kind}]: {splits}")
        skipped = {k: v for k, v in info.skipped.items() if v}
        if skipped:
            lines.append(f"    skipped {sum(skipped.values())}: {counts(skipped)}")
            for reason in sorted(skipped):
                lines.append(f"      {reason}: {', '.join(info.examples.get(reason, [])[:3])}")
        if getattr(info, "notes", None):
            lines.append(f"    written with changes: {counts(info.notes)}")
        lines += _validation_lines(info) + _vae_lines(info, manifest.vae_path, vae_min_psnr)
    if not any("val" in info.splits for info in manifest.sources.values()):
        lines.append("warning: no source has a validation split, and fit refuses to train without evaluation: "
                     "give a source val_path, or hold out a share (val_fraction > 0)")
    return "\n".join(lines)


def _validation_lines(info: SourceInfo) -> list[str]:
    """Where the source's validation split comes from and its size (held out: the share and the rule)."""
    n = info.splits["val"].samples if "val" in info.splits else 0
    if info.validation == "none":
        return ["    validation: none (val_fraction: 0)"]
    if info.validation == "held_out":
        rule = f"{n} samples held out by key hash (val_fraction {info.val_fraction:.3g})"
        return [f"    validation: {rule}" if n else f"    warning: validation: {rule}: raise val_fraction or give "
                "val_path"]
    return [f"    validation: {n} samples from {info.validation}"] if info.validation else []


def _vae_lines(info: SourceInfo, vae_path: str, min_psnr: float) -> list[str]:
    """The VAE's reconstruction PSNR on the source's images, and what to do when it is low."""
    if info.vae_psnr is None:
        return []
    lines = [f"    VAE reconstruction: {info.vae_psnr:.1f} dB PSNR on {info.vae_psnr_images} training images"]
    if info.vae_psnr < min_psnr:
        lines.append(
            f"    warning: the VAE reconstructs these images at {info.vae_psnr:.1f} dB, below vae_min_psnr "
            f"{min_psnr:g}: {vae_path} was trained on other images, and the model learns (and generates) its "
            f"distortions, e.g. wrong colours. Train a VAE on these images: python -m lit_transfusion vae fit "
            f"--config {VAE_CONFIG} (data.init_args.path: your images), then set vae_path to its export_dir")
    return lines
