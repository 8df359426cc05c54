"""The README and docs/ say only what works.

- Every command in a fenced ``bash`` block of README.md and docs/*.md that runs this project (``python -m
  lit_transfusion ...``, ``python -m datamodules...``, ``python benchmarks/...``, ``make ...``) is checked without
  training: fit/validate/test and ``vae``/``vq`` commands parse their config with ``--print_config``; ``sample``,
  ``export``, ``prepare``, the module and benchmark scripts show ``--help`` and must list every ``--flag`` the
  docs give them; a ``sweep`` with ``--config`` also lists its runs with its dry-run flag; ``make`` targets must
  exist (``make -n``). All Python checks run in one subprocess (one import of the project, a few seconds per
  command), so the whole file takes well under two minutes.
- README.md is at most 250 lines and starts with the two-command quickstart.
- Every relative link (and its ``#anchor``) in README.md, RESULTS.md and docs/*.md resolves.
- The worked examples of docs/extending.md (blocks tagged ``# docs-example: <name>``) run as written, followed by
  checks of what they claim.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "RESULTS.md"]
PARSE_ONLY = {"fit", "validate", "test"}
AUTOENCODERS = {"vae", "vq"}
HELP_ONLY = {"sample", "export", "prepare", "sweep", "reference"}


# ------------------------------------------------------------------------------------------- extraction
def fenced_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks of ``lang`` in a Markdown text."""
    return re.findall(rf"^```{lang}[ \t]*\n(.*?)^```", text, flags=re.S | re.M)


def shell_lines(block: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    out, buf = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        line, buf = buf + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def project_command(line: str) -> list[str] | None:
    """argv of a line that runs this project (``srun`` / ``.venv/bin/`` prefixes removed), else None."""
    try:
        argv = shlex.split(line, comments=True)
    except ValueError:
        return None
    while argv and argv[0] in ("srun",):
        argv = argv[1:]
    if argv and argv[0].startswith(".venv/bin/"):
        argv[0] = argv[0][len(".venv/bin/"):]
    if not argv:
        return None
    if argv[0] == "make":
        return argv
    if argv[0] in ("python", "python3") and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2 and argv[2].split(".")[0] in ("lit_transfusion", "datamodules"):
            return argv
        if argv[1].startswith("benchmarks/"):
            return argv
    return None


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every project command in the docs, each distinct command once."""
    seen, out = set(), []
    for path in DOCS:
        for block in fenced_blocks(path.read_text(), "bash"):
            for line in shell_lines(block):
                argv = project_command(line)
                if argv is not None and tuple(argv) not in seen:
                    seen.add(tuple(argv))
                    out.append((path.relative_to(ROOT).as_posix(), argv))
    return out


COMMANDS = doc_commands()


def flags(args: list[str]) -> list[str]:
    """The ``--option`` names in ``args`` (``--a=b`` -> ``--a``)."""
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


# ------------------------------------------------------------------------------------------- the checks
def checks_of(argv: list[str], dry_run_flag: str | None) -> list[dict]:
    """What to run for one documented command: a list of {target, args, kind}. target: "module:<name>" or
    "path:<file>"; kind: "parse" (exit 0) or "help" (exit 0 and every documented flag listed)."""
    if argv[1] == "-m":
        module, args = argv[2], argv[3:]
        target = f"module:{module}"
        if module == "lit_transfusion" and args:
            sub = args[0]
            if sub in PARSE_ONLY:
                return [dict(target=target, args=args + ["--print_config"], kind="parse", documented=[])]
            if sub in AUTOENCODERS:
                return [dict(target=target, args=args + ["--print_config"], kind="parse", documented=[])]
            if sub in HELP_ONLY:
                out = [dict(target=target, args=[sub, "--help"], kind="help", documented=flags(args[1:]))]
                if sub == "sweep" and "--config" in args and dry_run_flag and dry_run_flag not in args:
                    out.append(dict(target=target, args=args + [dry_run_flag], kind="parse", documented=[]))
                elif sub == "sweep" and dry_run_flag and dry_run_flag in args:
                    out.append(dict(target=target, args=args, kind="parse", documented=[]))
                return out
            raise AssertionError(f"a documented command the test does not know: {' '.join(argv)}")
        return [dict(target=target, args=["--help"], kind="help", documented=flags(args))]
    return [dict(target=f"path:{argv[1]}", args=["--help"], kind="help", documented=flags(argv[2:]))]


RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback
os.environ.setdefault("HF_HUB_OFFLINE", "1")
jobs = json.load(sys.stdin)
results = []
for job in jobs:
    kind, _, name = job["target"].partition(":")
    out = io.StringIO()
    rc = 0
    sys.argv = [name] + job["args"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(name, run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        rc = 1
        out.write(traceback.format_exc())
    results.append(dict(rc=rc, output=out.getvalue()[-20000:]))
print("\n@@RESULTS@@" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def python_checks() -> dict[tuple[str, ...], list[dict]]:
    """Run every Python check of every documented command in one subprocess: {argv: [check + rc + output]}."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    helped = subprocess.run([sys.executable, "-m", "lit_transfusion", "sweep", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    dry = next((f for f in ("--dry-run", "--dry_run") if f in helped.stdout), None)
    planned = [(tuple(argv), c) for _, argv in COMMANDS if argv[0] != "make" for c in checks_of(argv, dry)]
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps([c for _, c in planned]), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert "@@RESULTS@@" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout.rsplit("@@RESULTS@@", 1)[1])
    by_command: dict[tuple[str, ...], list[dict]] = {}
    for (argv, check), result in zip(planned, results, strict=True):
        by_command.setdefault(argv, []).append({**check, **result})
    return by_command


def test_the_docs_show_commands():
    kinds = {argv[0] if argv[0] == "make" else argv[1] for _, argv in COMMANDS}
    assert len(COMMANDS) >= 10 and {"make", "-m"} <= kinds, COMMANDS


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[f"{w}: {' '.join(a)[:80]}" for w, a in COMMANDS])
def test_documented_command_works(where, argv, python_checks):
    if argv[0] == "make":
        for target in [a for a in argv[1:] if not a.startswith("-") and "=" not in a] or ["all"]:
            made = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, f"{where}: `make {target}`: {made.stderr.strip()}"
        return
    for check in python_checks[tuple(argv)]:
        shown = " ".join(check["args"])
        assert check["rc"] == 0, f"{where}: `{' '.join(argv)}` -> `{shown}` exited {check['rc']}:\n{check['output']}"
        missing = [f for f in check["documented"] if f not in check["output"]]
        assert not missing, f"{where}: `{' '.join(argv)}` uses {missing}, which `{shown}` does not list"


# ------------------------------------------------------------------------------------------- README shape
def test_readme_is_short_and_starts_with_the_quickstart():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    headings = re.findall(r"^#+ .*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), flags=re.M)
    assert headings[0].startswith("# ") and headings[1].startswith("## Quickstart"), headings[:2]
    first = fenced_blocks(text, r"\w*")[0]
    assert text.index(first) < text.index(headings[2])
    commands = [shlex.split(line, comments=True) for line in shell_lines(first)]
    assert commands == [["make", "train"], ["make", "test"]], commands


# ------------------------------------------------------------------------------------------- links
def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links that do not resolve: {broken}"


# ------------------------------------------------------------------------------------------- the examples
def examples() -> dict[str, str]:
    """docs/extending.md's blocks tagged ``# docs-example: <name>``, by name."""
    out = {}
    for block in fenced_blocks((ROOT / "docs" / "extending.md").read_text(), "python"):
        m = re.match(r"# docs-example: (\S+)\n", block)
        if m:
            out[m[1]] = block
    return out


def run_example(name: str, namespace: dict | None = None) -> dict:
    namespace = {"__name__": f"docs_example_{name}"} if namespace is None else namespace
    exec(compile(examples()[name], f"docs/extending.md:{name}", "exec"), namespace)
    return namespace


def test_extending_examples_are_tagged():
    assert {"patcher", "objective", "representation", "source-reader"} <= set(examples())


def packed_batch(patch_size: int):
    from lit_transfusion.batch import Image, SpecialIds, Text, pack_rows

    special = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
    g = torch.Generator().manual_seed(0)
    docs = [[Text([1, 5 + k]), Image(torch.randn(4, 8, 8, generator=g)), Text([2])] for k in range(4)]
    return pack_rows([docs[:2], docs[2:]], 48, patch_size, special)


@pytest.mark.usefixtures("one_thread")
def test_example_new_patcher():
    from lit_transfusion.patching import patchify

    ns = run_example("patcher")
    module, patcher = ns["module"], ns["module"].model.patcher
    assert isinstance(patcher, ns["ConvPatcher"])
    p = module.config.patch_size
    # The conv patch embedding is a linear layer over patchify's raster-order patches.
    lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    conv = patcher.conv_in(lat).flatten(2).transpose(1, 2)
    linear = patchify(lat, p) @ patcher.conv_in.weight.flatten(1).T + patcher.conv_in.bias
    torch.testing.assert_close(conv, linear, rtol=1e-5, atol=1e-5)
    assert (patcher.conv_out.weight == 0).all()  # the model's init zeroed the output layer
    out = module.losses(packed_batch(p), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out["loss"]) and out["loss_image"] > 0
    out["loss"].backward()
    assert patcher.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.usefixtures("one_thread")
def test_example_new_objective():
    from lit_transfusion.diffusion import Diffusion
    from lit_transfusion.module import TransfusionModule

    ns = run_example("objective")  # the example asserts the oracle itself
    x0 = torch.randn(4, 4, 8, 8)
    noise = torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 100, 500, 999])
    d = ns["X0Diffusion"]()
    torch.testing.assert_close(d.target(x0, noise, t), x0)
    torch.testing.assert_close(d.add_noise(x0, noise, t), Diffusion().add_noise(x0, noise, t))
    # In place of a training module's Diffusion, the image loss is the MSE to the clean latent.
    special = dict(pad=0, bos=1, eos=2, boi=3, eoi=4)
    torch.manual_seed(0)
    module = TransfusionModule(vocab_size=32, special_ids=special, latent_shape=(4, 8, 8), size="nano")
    owner, attr = next((m, n) for m in module.modules() for n, c in m.named_children() if isinstance(c, Diffusion))
    setattr(owner, attr, d)
    b = packed_batch(module.config.patch_size)
    with torch.no_grad():
        got = module.losses(b, t=torch.full((b.num_images,), 300), generator=torch.Generator().manual_seed(3))
    # Output layers start at zero: the prediction is 0, so the MSE to x0 is the mean square of the latents.
    expected = b.latents.float().pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got["mse_per_image"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_example_new_representation(tmp_path):
    import lightning as L

    from lit_transfusion.batch import (
        Image,
        SpecialIds,
        Text,
        caption_image_document,
        greedy_rows,
        pack_pairs,
        pack_rows,
    )
    from lit_transfusion.generation import SamplingConfig
    from lit_transfusion.training import MixedModalModule

    torch.manual_seed(0)
    ns = run_example("representation")
    module, codec = ns["module"], ns["codec"]
    assert isinstance(module, MixedModalModule) and isinstance(module.representation, ns["PixelPatches"])
    assert isinstance(module.codec, module.representation.codec_type) and module.config.latent_shape == (3, 8, 8)
    # The codec: 32 px -> 8x8x3 means and back; blockwise-constant images round-trip exactly; save / from_dir.
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    pixels = blocks.repeat_interleave(4, -1).repeat_interleave(4, -2)  # [4, 3, 32, 32]
    latents = codec.encode(pixels)
    torch.testing.assert_close(latents, blocks * codec.scale)
    torch.testing.assert_close(codec.decode(latents), pixels)
    codec.save(tmp_path / "pixels")
    again = type(codec).from_dir(tmp_path / "pixels")
    assert (again.factor, again.scale) == (codec.factor, codec.scale)

    # A packed batch of pixel images: a finite loss whose gradient reaches the patcher and the transformer.
    special = SpecialIds(**ns["special"])
    docs = [[Text([1, 5 + k % 20, 6 + k % 7]), Image(codec.encode(pixels[k % 4: k % 4 + 1])[0]), Text([2])]
            for k in range(12)]
    batches = [pack_rows(greedy_rows(docs[i:i + 4], 64, 16), 64, 2, special) for i in (0, 4, 8)]
    # A fresh model predicts 0 (zero output layers), so the image MSE is the mean square of the noise (ε-prediction).
    b = batches[0]
    with torch.no_grad():
        got = module.losses(b, t=torch.full((b.num_images,), 300), generator=torch.Generator().manual_seed(3))
    noise = torch.randn(b.latents.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got["mse_per_image"], noise.pow(2).flatten(1).mean(1))
    out = module.training_losses(b)
    assert set(module.representation.logged_losses) <= set(out) and torch.isfinite(out["loss"])
    assert out["loss_image"] > 0 and out["loss_text"] > 0
    out["loss"].backward()
    assert module.model.patcher.output_layers()[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in module.model.parameters())
    assert sum(p.grad.abs().sum() for p in module.model.transformer.parameters()) > 0
    module.zero_grad()

    # Three optimizer steps under a Lightning Trainer (CPU, fp32) change the weights.
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 3
    after = module.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # val/cond_gap terms of caption pairs: [4 pairs, 1 level, 2], finite.
    pairs = pack_pairs([(caption_image_document([5 + k], Image(latents[k]), special),
                         caption_image_document([5 + (k + 1) % 4], Image(latents[k]), special)) for k in range(4)],
                       2, special)
    with torch.no_grad():
        terms = module.representation.cond_gap(module, pairs, 0)
    assert terms.shape == (4, module.representation.cond_gap_levels, 2) and torch.isfinite(terms).all()

    # One image through the module's sampler, decoded to pixels by the module's codec.
    cfg = SamplingConfig(steps=3, scheduler="ddim", guidance_scale=2.0, seed=0)
    with torch.no_grad():
        sampler = module.sampler()
        image = sampler.generate_images([[5, 6]], cfg)
    assert sampler.diffusion is module.representation.diffusion  # it samples the process it trained
    assert image.shape == (1, *module.config.latent_shape) and torch.isfinite(image).all()
    decoded = module.codec.decode(image)
    assert decoded.shape == (1, 3, 32, 32) and decoded.abs().max() <= 1


def test_example_new_data_source(tmp_path):
    from types import SimpleNamespace

    from datamodules.files.records import Skips

    ns = run_example("source-reader")
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"not decoded here")
    (tmp_path / "captions.csv").write_text(
        "file_name,text\na.png,a red circle\nb.png,  a blue   square \nmissing.png,a cat\nc.png,   \n,no file\n"
    )
    cfg = SimpleNamespace(name="photos", kind="csv", path=str(tmp_path), val_path=None, val_fraction=None,
                          held_out=0.0, caption_column="text")
    skips = Skips()
    units = ns["READER"].units(cfg, "train", skips)
    records = [r for u in units for r in u.records(Skips())]
    assert [(r.key, r.captions) for r in records] == [("a.png", ["a red circle"]), ("b.png", ["a blue square"])]
    assert dict(skips.counts) == {"missing_file": 2, "empty_caption": 1}
    assert ns["READER"].units(cfg, "val", Skips()) == []
    # Held out by key hash: train and val partition the good rows, and each skip is counted once.
    cfg.held_out = 0.5
    train, val = Skips(), Skips()
    keys = [r.key for split, s in (("train", train), ("val", val))
            for u in ns["READER"].units(cfg, split, s) for r in u.records(Skips())]
    assert sorted(keys) == ["a.png", "b.png"] and train.total + val.total == 3


def test_example_reader_is_what_the_registry_holds():
    """The example builds the same kind of object the source-reader registry maps a ``kind`` to."""
    registry = pytest.importorskip("datamodules.files.sources.registry")
    ns = run_example("source-reader")
    assert all(isinstance(r, type(ns["READER"])) for r in registry.READERS.values())
    assert {r.record_kind for r in registry.READERS.values()} >= {ns["READER"].record_kind}
