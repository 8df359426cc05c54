import torch

from lit_transfusion.attention import dense_mask
from lit_transfusion.transformer import Block, Routing, Transformer, TransformerConfig, apply_rope, rope_table


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    table = rope_table(8, 64, 10000.0)

    def score(pq, pk):
        return (apply_rope(q, table[[pq]][None]) * apply_rope(k, table[[pk]][None])).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    assert not torch.allclose(score(5, 2), score(5, 4))
    # a rotation: norms are preserved
    torch.testing.assert_close(apply_rope(q, table[[9]][None]).norm(), q.norm())


def test_kv_prefix_equals_full_pass():
    """Running the last positions against cached keys/values of the first ones equals one full pass."""
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=64)
    net = Transformer(cfg).eval()
    B, L, split = 2, 12, 7
    x = torch.randn(B, L, 32)
    pos = torch.arange(L).expand(B, L)
    doc = torch.zeros(B, L, dtype=torch.long)
    img = torch.full((B, L), -1)
    img[:, 8:11] = 0  # an image straddling nothing: bidirectional block inside the suffix
    full, _ = net(x, pos, dense_mask(doc, img))
    _, kv = net(x[:, :split], pos[:, :split], dense_mask(doc[:, :split], img[:, :split]))
    tail, _ = net(x[:, split:], pos[:, split:], dense_mask(doc, img, doc[:, split:], img[:, split:]), past=kv)
    torch.testing.assert_close(tail, full[:, split:], rtol=1e-5, atol=1e-5)


def test_cpu_bf16_autocast_matches_fp32_and_keeps_the_mask():
    """Under CPU bf16 autocast (``precision: bf16-mixed``; attention itself runs in fp32 there) the output
    stays within bf16 rounding of the fp32 pass, and a later position still cannot reach an earlier one."""
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    net = Transformer(cfg).eval()
    B, L = 2, 16
    x = torch.randn(B, L, 64)
    pos = torch.arange(L).expand(B, L)
    doc = torch.zeros(B, L, dtype=torch.long)
    img = torch.full((B, L), -1)
    img[:, 5:9] = 0
    mask = dense_mask(doc, img)
    ref, _ = net(x, pos, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, kv = net(x, pos, mask)
        x2 = x.clone()
        x2[:, 12:] += 1.0  # only positions after the image change
        out2, _ = net(x2, pos, mask)
    assert kv[0][0].dtype == torch.bfloat16  # the projections did run in bf16
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err
    torch.testing.assert_close(out2[:, :12], out[:, :12], rtol=0, atol=0)
    assert not torch.equal(out2[:, 12:], out[:, 12:])


def test_block_takes_a_modality_tensor_or_its_routing():
    """A Mixture-of-Transformers block gives the same result from a [B, L] modality tensor as from its Routing (the
    Transformer computes one per forward); a dense block ignores the modality."""
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=16)
    B, L = 2, 9
    x = torch.randn(B, L, 32)
    rope = Transformer(cfg).rope[torch.arange(L).expand(B, L)]
    mask = dense_mask(torch.zeros(B, L, dtype=torch.long), torch.full((B, L), -1))
    modality = (torch.arange(L) % 3 == 0).long().expand(B, L)
    mot = Block(TransformerConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=16, modalities=2))
    a, kv_a = mot(x, rope, mask, modality=modality)
    b, kv_b = mot(x, rope, mask, modality=Routing(modality, 2, x.shape))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(kv_a, kv_b, rtol=0, atol=0)
    assert not torch.allclose(a, mot(x, rope, mask)[0])  # None = every position through tower 0
    dense = Block(cfg)
    torch.testing.assert_close(dense(x, rope, mask, modality=modality)[0], dense(x, rope, mask)[0], rtol=0, atol=0)
