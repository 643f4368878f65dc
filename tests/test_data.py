import torch

from s2o import data


def test_structured_qkv_is_seeded_and_shaped():
    q, k, v = data.structured_qkv(600, q_heads=8, kv_heads=2, head_dim=64, seed=5)
    assert q.shape == (1, 8, 600, 64) and k.shape == v.shape == (1, 2, 600, 64)
    assert q.dtype == torch.bfloat16
    q2, k2, v2 = data.structured_qkv(600, q_heads=8, kv_heads=2, head_dim=64, seed=5)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    q3, _, _ = data.structured_qkv(600, q_heads=8, kv_heads=2, head_dim=64, seed=6)
    assert not torch.equal(q, q3)


def test_head_profiles_cover_every_type():
    kinds = {p.kind for p in data.head_profiles(32)}
    assert kinds == set(data.HEAD_TYPES)


def test_attention_is_concentrated_except_in_diffuse_heads():
    q, k, _ = data.structured_qkv(2048, dtype=torch.float32)
    shares = data.attention_mass_stats(q, k)  # [Hq, 3]: top 1%, 3%, 10% of keys
    assert shares.shape == (32, 3)
    assert (shares[:, 0] <= shares[:, 1]).all() and (shares[:, 1] <= shares[:, 2]).all()
    kinds = [p.kind for p in data.head_profiles(32)]
    diffuse = torch.tensor([kind == "diffuse" for kind in kinds])
    # Structured heads put most mass on 3% of the keys; diffuse ones clearly less.
    assert shares[~diffuse, 1].median() > 0.9
    assert shares[diffuse, 1].max() < shares[~diffuse, 1].median()


def test_rope_preserves_norms_and_relative_positions():
    x = torch.randn(1, 1, 50, 16)
    rotated = data.rope(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # q_i . k_j after RoPE depends only on i - j for position-independent q and k.
    u, w = torch.randn(16), torch.randn(16)
    qs, ks = data.rope(u.expand(1, 1, 50, 16)), data.rope(w.expand(1, 1, 50, 16))
    torch.testing.assert_close(qs[0, 0, 30] @ ks[0, 0, 20], qs[0, 0, 40] @ ks[0, 0, 30])
