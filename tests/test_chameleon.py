"""The discrete-token baseline: loss bookkeeping on a hand-built batch, cached == recomputed code decoding,
guidance on the logits, text/code separation in decoding, the cond-gap NLL, learning, the datamodule's code
mode, and fit -> test -> sample through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from callbacks.perplexity import perplexity
from lit_transfusion.batch import IGNORE, SpecialIds, Text, code_segment, pack_rows
from lit_transfusion.chameleon import ChameleonModule
from lit_transfusion.chameleon_sampler import ChameleonSampler
from lit_transfusion.generation import SamplingConfig
from tests.conftest import ROOT, run_cli

FIRST, K = 20, 16  # text ids 0..19, image codes 20..35
SP = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4, first_code=FIRST)


def make_module(image_token_weight: float = 1.0, seed: int = 0) -> ChameleonModule:
    torch.manual_seed(seed)
    return ChameleonModule(vocab_size=FIRST + K, special_ids=vars(SP), latent_shape=(1, 2, 2), size="nano",
                           max_seq_len=128, image_token_weight=image_token_weight)


def hand_batch():
    codes = torch.tensor([[[0, 5], [3, 15]]])  # [1, h, w]
    doc = [Text([SP.bos, 7, 8]), code_segment(codes, SP), Text([SP.eos])]
    return pack_rows([[doc]], 16, 1, SP)


def test_targets_and_weighted_loss_by_hand():
    batch = hand_batch()
    c = [FIRST + 0, FIRST + 5, FIRST + 3, FIRST + 15]
    assert batch.seq.tokens[0, :10].tolist() == [SP.bos, 7, 8, SP.boi, *c, SP.eoi, SP.eos]
    # Text predicts text and <boi>; <boi> and each code predict the next code; the last code never predicts the
    # appended <eoi>; <eoi> predicts <eos>.
    assert batch.targets[0, :10].tolist() == [7, 8, SP.boi, c[0], c[1], c[2], c[3], IGNORE, SP.eos, IGNORE]
    assert batch.num_images == 0
    for weight in (1.0, 0.25):
        m = make_module(weight)
        out = m.losses(batch)
        logp = m.model.logits(m(batch).hidden).float().log_softmax(-1)[0]  # [L, V]
        targets = batch.targets[0]
        ce = {i: -float(logp[i, targets[i]]) for i in range(16) if targets[i] != IGNORE}
        text = [ce[i] for i in (0, 1, 2, 8)]
        image = [ce[i] for i in (3, 4, 5, 6)]
        assert out["loss_text"].item() == pytest.approx(sum(text) / 4, rel=1e-5)
        assert out["loss_image"].item() == pytest.approx(sum(image) / 4, rel=1e-5)
        expected = (sum(text) + weight * sum(image)) / (4 + weight * 4)
        assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_every_parameter_gets_a_gradient_on_a_text_only_batch():
    m = make_module()
    batch = pack_rows([[[Text([SP.bos, 5, 6, SP.eos])]]], 8, 1, SP)
    m.losses(batch)["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())
    assert not hasattr(m.model, "patcher") or m.model.patcher is None


def test_perplexity_counts_text_targets_only():
    m = make_module().eval()
    batch = hand_batch()
    logp = m.model.logits(m(batch).hidden).float().log_softmax(-1)[0]
    text_ce = [-float(logp[i, batch.targets[0, i]]) for i in (0, 1, 2, 8)]
    assert perplexity(m, [batch]) == pytest.approx(float(torch.tensor(text_ce).mean().exp()), rel=1e-5)


def test_code_nll_per_document_matches_brute_force():
    m = make_module().eval()
    gen = torch.Generator().manual_seed(0)
    docs = []
    for n in (2, 5):
        codes = torch.randint(0, K, (1, 2, 2), generator=gen)
        docs.append([Text([SP.bos] + list(range(5, 5 + n))), code_segment(codes, SP), Text([SP.eos])])
    batch = pack_rows([[d] for d in docs], 16, 1, SP)
    got = m.representation.code_nll_per_document(m, batch)
    for row in range(2):
        logp = m.model.logits(m(batch).hidden).float().log_softmax(-1)[row]
        t = batch.targets[row]
        want = [-float(logp[i, t[i]]) for i in range(16) if t[i] >= FIRST]
        assert len(want) == 4
        assert float(got[row]) == pytest.approx(sum(want) / 4, rel=1e-5)


# ------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def trained_ish():
    """A nano model with random weights scaled up, so logits are far from uniform and decoding is not trivial."""
    m = make_module(seed=3).eval()
    with torch.no_grad():
        m.model.lm_head.weight.mul_(30)
    return m


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_and_recomputed_decoding_give_the_same_codes(trained_ish, temperature):
    cfg = SamplingConfig(guidance_scale=3.0, image_temperature=temperature, seed=5)
    captions = [[5, 6, 7], [9], [10, 11, 12, 13, 14]]  # ragged: rows are left-padded
    cached = ChameleonSampler(trained_ish.model, SP, use_cache=True).generate_images(captions, cfg)
    full = ChameleonSampler(trained_ish.model, SP, use_cache=False).generate_images(captions, cfg)
    assert cached.shape == (3, 1, 2, 2) and cached.dtype == torch.long
    assert torch.equal(cached, full)
    assert int(cached.min()) >= 0 and int(cached.max()) < K


def test_mixed_generation_and_captions_cached_equal_recomputed(trained_ish):
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, guidance_scale=2.0, seed=1)
    images = torch.randint(0, K, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    out = [ChameleonSampler(trained_ish.model, SP, use_cache=c).caption(images, cfg) for c in (True, False)]
    assert out[0] == out[1]
    mixed = [ChameleonSampler(trained_ish.model, SP, use_cache=c).generate([5, 6], cfg) for c in (True, False)]
    assert [x.tolist() if torch.is_tensor(x) else x for x in mixed[0]] == \
        [x.tolist() if torch.is_tensor(x) else x for x in mixed[1]]


def test_guidance_acts_on_the_logits(trained_ish):
    """The first code of a greedy guided draw is the argmax of u + s·(c - u), with c and u the next-token logits of
    full forwards over ``<bos> caption <boi>`` and ``<bos> <boi>``."""
    s = 2.5
    caption = [5, 6, 7]
    codes = ChameleonSampler(trained_ish.model, SP).generate_images(
        [caption], SamplingConfig(guidance_scale=s, image_temperature=0.0))
    logits = []
    for ids in ([SP.bos, *caption, SP.boi], [SP.bos, SP.boi]):
        b = pack_rows([[[Text(ids)]]], len(ids), 1, SP)
        logits.append(trained_ish.model.logits(trained_ish(b).hidden)[0, -1, FIRST:])
    guided = logits[1] + s * (logits[0] - logits[1])
    assert int(codes.flatten()[0]) == int(guided.argmax())
    assert int(guided.argmax()) != int(logits[0].argmax()) or int(guided.argmax()) != int(logits[1].argmax())


def test_text_decoding_never_emits_codes_and_images_only_codes():
    m = make_module().eval()
    # An output layer with constant logits (zero weights, a bias): code 7 is the most likely token of all.
    head = torch.nn.Linear(m.model.lm_head.in_features, FIRST + K)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(0.0)
        head.bias[FIRST:] = 1.0
        head.bias[FIRST + 7] = 2.0
    m.model.lm_head = head
    sampler = ChameleonSampler(m.model, SP)
    cfg = SamplingConfig(max_new_tokens=5, temperature=0.0, image_temperature=0.0, guidance_scale=1.0)
    caption = sampler.caption(torch.zeros(1, 1, 2, 2, dtype=torch.long), cfg)[0]
    assert caption and all(i < FIRST for i in caption)
    with torch.no_grad():
        head.bias[5:FIRST] = 50.0  # text now far more likely than any code
    codes = sampler.generate_images([[5]], cfg)
    assert codes.flatten().tolist() == [7, 7, 7, 7]


def test_learns_a_fixed_batch():
    m = make_module()
    batch = hand_batch()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = m.losses(batch)["loss"].item()
    for _ in range(40):
        opt.zero_grad()
        loss = m.losses(batch)["loss"]
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_settings_are_checked():
    with pytest.raises(ValueError, match="image_tokens: codes"):
        ChameleonModule(vocab_size=30, special_ids=dict(pad=0, bos=1, eos=2, boi=3, eoi=4), latent_shape=(1, 2, 2),
                        size="nano")
    from lit_transfusion.module import TransfusionModule

    with pytest.raises(ValueError, match="ChameleonModule"):
        TransfusionModule(vocab_size=30, special_ids=vars(SP), latent_shape=(4, 4, 4), size="nano")


# ----------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    from lit_transfusion.vq import build_vq

    path = tmp_path_factory.mktemp("vq")
    build_vq(num_vq_embeddings=32).save_pretrained(str(path))
    return path


def code_data(tmp, vq_dir, **settings):
    from datamodules.shapes import ShapesDataModule

    args = dict(data_dir=str(tmp / "cache"), image_tokens="codes", vq_path=str(vq_dir), num_train=32, num_val=16,
                val_rows=2, cond_gap_pairs=8, seq_len=256, batch_size=4, patch_size=1)
    return ShapesDataModule(**{**args, **settings})


def test_datamodule_code_mode(tmp_path, vq_dir):
    dm = code_data(tmp_path, vq_dir)
    dm.setup()
    first = dm.special_ids["first_code"]
    assert first == dm.tokenizer.vocab_size and dm.vocab_size == first + 32 and dm.latent_shape == (1, 8, 8)
    assert dm.latents["train"].dtype == torch.long and dm.latents["train"].shape == (32, 1, 8, 8)
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_images == 0
    tokens = batch.seq.tokens
    for row in tokens:
        row = row.tolist()
        starts = [i for i, t in enumerate(row) if t == dm.tokenizer.special.boi]
        assert starts
        for s in starts:  # every image: <boi>, 64 codes, <eoi>
            assert all(first <= t < first + 32 for t in row[s + 1 : s + 65]) and row[s + 65] == dm.tokenizer.special.eoi
        assert sum(first <= t for t in row) == 64 * len(starts)
    # The stored codes are the tokenizer's codes of the rendered images.
    from lit_transfusion.images import images_to_tensor
    from lit_transfusion.vq import CodeCodec

    image = images_to_tensor(dm.world.sample("train", 3).image[None])
    assert torch.equal(CodeCodec.from_dir(vq_dir).encode(image)[0], dm.latents["train"][3, 0])
    with pytest.raises(ValueError, match="patch_size"):
        code_data(tmp_path, vq_dir, patch_size=2)


def test_fit_test_sample_through_the_cli(tmp_path, vq_dir):
    small = ["--model.init_args.size=nano", f"--data.init_args.vq_path={vq_dir}",
             f"--data.init_args.data_dir={tmp_path / 'cache'}", "--data.init_args.num_train=32",
             "--data.init_args.num_val=16", "--data.init_args.val_rows=2", "--data.init_args.cond_gap_pairs=8",
             "--trainer.log_every_n_steps=1", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
             "--trainer.callbacks.init_args.prompts_per_family=1", "--trainer.callbacks.init_args.images_per_prompt=1",
             "--trainer.callbacks.init_args.grid_images=1", "--trainer.callbacks.init_args.num_captions=2",
             "--trainer.callbacks.init_args.ppl_documents=4", "--trainer.callbacks.init_args.fid_real=16"]
    fit = run_cli("fit", "--config", "configs/shapes/chameleon.yaml", *small, "--trainer.max_steps=3",
                  "--trainer.val_check_interval=3")
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "runs" / "shapes-chameleon" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())["latest"]
    for key in ("val/loss_image", "val/loss_text", "val/cond_gap", "val/fid", "val/geneval/overall",
                "val/caption_acc", "val/ppl_text", "val/ppl_caption"):
        assert key in metrics
    ckpt = run / "checkpoints" / "last.ckpt"
    test = run_cli("test", "--config", "configs/shapes/chameleon.yaml", *small, f"--ckpt_path={ckpt}")
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/fid" in json.loads((run.parent / "version_1" / "metrics_test.json").read_text())["latest"]
    out = tmp_path / "samples"
    sample = run_cli("sample", f"--ckpt_path={ckpt}", "--prompt", "a blue square", "--num_images=2", f"--out={out}")
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (out / "000_1.png").is_file() and (out / "grid.png").is_file()
    caption = run_cli("sample", f"--ckpt_path={ckpt}", f"--image={out / '000_0.png'}", f"--out={out / 'c'}")
    assert caption.returncode == 0, caption.stderr[-3000:]
    assert "caption" in json.loads((out / "c" / "samples.json").read_text())
    # export writes the token baseline too (its VQ tokenizer as the codec); sample runs from the export
    exported = tmp_path / "export"
    export = run_cli("export", f"--ckpt_path={ckpt}", f"--out={exported}")
    assert export.returncode == 0, export.stderr[-3000:]
    assert {p.name for p in exported.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json", "vq"}
    from_export = run_cli("sample", f"--ckpt_path={exported}", "--prompt", "a blue square", "--num_images=1",
                          f"--out={out / 'e'}")
    assert from_export.returncode == 0, from_export.stderr[-3000:]
    assert (out / "e" / "grid.png").is_file()


def test_shipped_config_is_the_tiny_recipe_with_codes():
    import yaml

    chameleon = yaml.safe_load((ROOT / "configs/shapes/chameleon.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "configs/shapes/tiny.yaml").read_text())
    assert chameleon["model"]["init_args"]["size"] == tiny["model"]["init_args"]["size"]
    c, t = chameleon["data"]["init_args"], tiny["data"]["init_args"]
    assert c["image_tokens"] == "codes"
    assert c["seq_len"] * c["batch_size"] == t["seq_len"] * t["batch_size"]  # equal positions per step
    for key in ("text_ratio", "image_first_ratio", "caption_dropout", "scene_caption_ratio", "num_train"):
        assert c[key] == t[key]
