"""Native C++ ops against their pure-torch references."""
import pytest
import torch

from droidspeak import kernels
from droidspeak.kernels import reference
from droidspeak.layers.rotary import cos_sin_cache
from helpers import pytest_without_amx



def test_extension_is_built():
    # `make test` builds csrc/; the engine must not silently fall back in CI.
    assert kernels.native_available()


def _qkv(T, hq, hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, generator=g).to(dtype)

    def views(x):
        q, k, v = x.split([hq * D, hkv * D, hkv * D], -1)  # strided views, as in the model
        return q.reshape(T, hq, D), k.reshape(T, hkv, D), v.reshape(T, hkv, D)
    return qkv, views


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hkv,D", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_rope_and_store_matches_reference(dtype, atol, hq, hkv, D):
    from droidspeak import _C
    T, S = 41, 300
    qkv, views = _qkv(T, hq, hkv, D, dtype, 0)
    cs = cos_sin_cache(D, 4096, 10000.0, None)
    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 4096, (T,), generator=g)
    loc = torch.randperm(S, generator=g)[:T] + 1
    caches = [torch.zeros(S + 1, hkv, D, dtype=dtype) for _ in range(4)]
    a, b = qkv.clone(), qkv.clone()
    _C.rope_and_store(*views(a), pos, cs, caches[0], caches[1], loc)
    reference.rope_and_store(*views(b), pos, cs, caches[2], caches[3], loc)
    # bf16: the two round at different steps, so allow one ulp of the larger values too
    rtol = 0 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(caches[0].float(), caches[2].float(), atol=atol, rtol=rtol)
    assert torch.equal(caches[1], caches[3])
    untouched = torch.ones(S + 1, dtype=torch.bool)
    untouched[loc] = False
    assert not caches[0][untouched].any()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
# bf16 on AMX: every shape runs on tiles (head dims 32-128, up to 16 query heads per
# KV head); without AMX (test_vector_paths_without_amx) (9, 3, 64), (6, 3, 128) and
# (4, 1, 64) take the register-tiled path, the others the generic one
@pytest.mark.parametrize("hq,hkv,D", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 3, 128), (4, 1, 64),
                                      (16, 1, 96)])
def test_decode_attention_matches_reference(dtype, atol, hq, hkv, D):
    from droidspeak import _C
    B, S, width = 7, 700, 800
    g = torch.Generator().manual_seed(1)
    k = torch.randn(S + 1, hkv, D, generator=g).to(dtype)
    v = torch.randn(S + 1, hkv, D, generator=g).to(dtype)
    table = torch.zeros(10, width, dtype=torch.int32)
    rows = torch.tensor([9, 0, 3, 4, 5, 1, 2])
    lens = torch.tensor([1, 63, 64, 65, 200, 700, 129])
    for r, n in zip(rows.tolist(), lens.tolist()):
        table[r, :n] = torch.randint(1, S + 1, (n,), generator=g).int()
    q = torch.randn(B, hq, D, generator=g).to(dtype)
    out = _C.decode_attention(q, k, v, table, rows, lens, D ** -0.5)
    ref = reference.decode_attention(q, k, v, table, rows, lens, D ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
# bf16 with D <= 64 packs K^T/V for tiles where the CPU has AMX; D = 128 gathers them plain
@pytest.mark.parametrize("hq,hkv,D", [(9, 3, 64), (4, 4, 32), (4, 2, 128)])
@pytest.mark.parametrize("case", ["short", "long", "few"])
def test_extend_attention_matches_reference(dtype, atol, hq, hkv, D, case):
    """Ragged prefill over pool slots (fresh sequences, and spans over a stored
    prefix as the cross-model recompute runs), fused with RoPE and the store. The
    long case spans many of the bf16 path's 64-query blocks, with ragged ends; in
    the few case every request adds at most 16 tokens (a short prompt over a cached
    prefix), which bf16 on AMX runs on the decode kernel's tiles."""
    from droidspeak import _C
    from droidspeak.layers.rotary import cos_sin_cache
    long = case == "long"
    S, width = (3000, 1200) if long else (800, 400)
    g = torch.Generator().manual_seed(2)
    if long:
        prefix_lens, extend_lens = [0, 300, 0, 1000, 0], [700, 201, 63, 130, 65]
    elif case == "few":
        prefix_lens, extend_lens = [0, 37, 350, 1, 200], [16, 7, 1, 1, 11]
    else:
        prefix_lens, extend_lens = [0, 37, 120, 1, 0], [5, 20, 64, 1, 33]
    rows = torch.tensor([3, 0, 7, 1, 2])
    table = torch.zeros(8, width, dtype=torch.int32)
    perm = torch.randperm(S, generator=g) + 1
    used = 0
    locs = []
    for r, p, n in zip(rows.tolist(), prefix_lens, extend_lens):
        table[r, :p + n] = perm[used:used + p + n].int()
        locs.append(table[r, p:p + n].long())
        used += p + n
    loc = torch.cat(locs)
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens, extend_lens)])
    T = loc.numel()
    cos_sin = cos_sin_cache(D, width, 10000.0, None)
    q = torch.randn(T, hq, D, generator=g).to(dtype)
    k = torch.randn(T, hkv, D, generator=g).to(dtype)
    v = torch.randn(T, hkv, D, generator=g).to(dtype)
    pools = [torch.randn(S + 1, hkv, D, generator=g).to(dtype) for _ in range(2)]
    native_in = [t.clone() for t in (q, k, v, *pools)]
    ref_in = [t.clone() for t in (q, k, v, *pools)]
    out = _C.extend_attention(*native_in[:3], positions, cos_sin, native_in[3], native_in[4], loc, table, rows,
                              prefix_lens, extend_lens, D ** -0.5)
    ref = reference.extend_attention(*ref_in[:3], positions, cos_sin, ref_in[3], ref_in[4], loc, table, rows,
                                     prefix_lens, extend_lens, D ** -0.5)
    # bf16: one rounding apart is up to 1/128 relative (0.031 at 4), in the output and in
    # the pool (RoPE at positions past 1,000).
    rtol = 0 if dtype == torch.float32 else 1 / 128
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    for a, b in zip(native_in[3:], ref_in[3:]):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
    with pytest.raises(RuntimeError, match="extend_lens must sum"):
        _C.extend_attention(q.clone(), k.clone(), v.clone(), positions, cos_sin, pools[0].clone(), pools[1].clone(),
                            loc, table, rows, prefix_lens, [1] * 5, D ** -0.5)


def test_dispatch_falls_back_to_reference_for_unsupported_inputs():
    # A meta-device tensor is not CPU: the dispatcher must take the reference path.
    assert not kernels._supported(torch.empty(1, device="meta"))


def _grouped_case(T, K, N, G, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(torch.bfloat16)
    weights = [torch.randn(N, K, generator=g).div(K ** 0.5).to(torch.bfloat16) for _ in range(G)]
    biases = [torch.randn(N, generator=g).to(torch.bfloat16) if bias else None for _ in range(G)]
    owner = torch.randint(0, G, (T,), generator=g)
    owner[:G] = torch.arange(G)  # every group has a row
    rows = [(owner == i).nonzero().flatten() for i in range(G)]
    return x, weights, biases, rows


# AMX tiles where K % 32 == 0 and N % 16 == 0 (more than 16 rows per group, a
# last task of one 16-feature tile, three row blocks), the dot-product path otherwise
@pytest.mark.parametrize("T,K,N,G,bias", [(16, 576, 960, 4, False), (5, 64, 67, 2, True),
                                           (40, 100, 130, 3, False), (1, 1536, 576, 1, True),
                                           (40, 576, 208, 2, True), (33, 64, 48, 1, False),
                                           (223, 576, 960, 2, True)])
def test_grouped_linear_matches_reference(T, K, N, G, bias):
    x, weights, biases, rows = _grouped_case(T, K, N, G, bias, 0)
    got = kernels.grouped_linear(x, weights, biases, rows)
    want = reference.grouped_linear(x.float(), [w.float() for w in weights],
                                    [b.float() if b is not None else None for b in biases], rows)
    # fp32 sums of bf16 products, rounded once to bf16: within one bf16 ulp
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-2)


def test_grouped_linear_uses_amx_where_the_cpu_has_it():
    from droidspeak import _C
    flags = open("/proc/cpuinfo").read().split()
    assert _C.amx_available() == ("amx_bf16" in flags and "amx_tile" in flags)


@pytest.mark.parametrize("T,K,N", [(24, 576, 192), (40, 576, 96), (24, 100, 60), (223, 576, 208)])
def test_grouped_linear_row_is_independent_of_its_batch(T, K, N):
    # a row's result must not depend on which rows or groups share the call: this
    # is what makes a co-batched request equal the same request served alone
    # (AMX tiles with one and two row blocks, and the dot-product path)
    x, weights, biases, rows = _grouped_case(T, K, N, 3 if T < 40 else 1, True, 1)
    full = kernels.grouped_linear(x, weights, biases, rows)
    for g, r in enumerate(rows):
        alone = kernels.grouped_linear(x.index_select(0, r), [weights[g]], [biases[g]],
                                       [torch.arange(r.numel())])
        assert torch.equal(alone, full.index_select(0, r))
    one = rows[0][:1]
    single = kernels.grouped_linear(x.index_select(0, one), [weights[0]], [biases[0]], [torch.zeros(1, dtype=torch.long)])
    assert torch.equal(single[0], full[one[0]])


@pytest.mark.parametrize("K,N", [(576, 200), (100, 60), (1536, 576)])
def test_grouped_linear_few_rows_equal_the_tiled_rows(K, N):
    # groups of up to three rows read the weights row by row (the dot-product
    # path's streaming loop), larger ones in tiles of rows: the same sums in the
    # same order, so each row is bit-identical either way, bias and the outputs
    # past the last 16-feature block included
    x, weights, biases, _ = _grouped_case(16, K, N, 1, True, 3)
    tiled = kernels.grouped_linear(x, weights, biases, [torch.arange(16)])
    for m in (1, 2, 3):
        few = kernels.grouped_linear(x[:m].contiguous(), weights, biases, [torch.arange(m)])
        assert torch.equal(few, tiled[:m])
    want = reference.grouped_linear(x.float(), [weights[0].float()], [biases[0].float()], [torch.arange(16)])
    torch.testing.assert_close(tiled.float(), want, rtol=8e-3, atol=1e-2)


def test_grouped_linear_rejects_bad_input():
    x, weights, biases, rows = _grouped_case(8, 64, 32, 2, False, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.grouped_linear(x, weights, biases, [rows[0], torch.tensor([8])])
    with pytest.raises(RuntimeError, match="same N and K"):
        kernels.grouped_linear(x, [weights[0], weights[1][:16]], biases, rows)
    with pytest.raises(RuntimeError, match="bfloat16"):
        from droidspeak import _C
        _C.grouped_linear(x.float(), weights, biases, rows)


@pytest.mark.parametrize("T,H,groups", [(16, 576, None), (3, 64, 2), (130, 100, 3)])
def test_rmsnorm_matches_reference(T, H, groups):
    g = torch.Generator().manual_seed(T)
    x = (torch.randn(T, H, generator=g) * 3).to(torch.bfloat16)
    if groups:
        weight = (1 + 0.1 * torch.randn(groups, H, generator=g)).to(torch.bfloat16)
        row_group = torch.randint(0, groups, (T,), generator=g)
    else:
        weight, row_group = (1 + 0.1 * torch.randn(H, generator=g)).to(torch.bfloat16), None
    from droidspeak import _C
    got = _C.rmsnorm(x, weight, row_group, 1e-5)
    want = reference.rmsnorm(x, weight, row_group, 1e-5)
    # same roundings; only the fp32 sum of squares runs in another order
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)
    assert (got != want).float().mean() < 0.01
    with pytest.raises(RuntimeError, match="out of range"):
        _C.rmsnorm(x, weight.reshape(1, -1)[:, :H] if groups is None else weight, torch.full((T,), 9), 1e-5)


@pytest.mark.parametrize("T,groups", [(5, None), (130, 3)])
def test_add_rmsnorm_equals_add_then_rmsnorm(T, groups):
    # the layer stack's fused residual add + norm must be the Python layers' two ops bit for bit
    g = torch.Generator().manual_seed(T)
    H = 576
    x = (torch.randn(T, H, generator=g) * 3).to(torch.bfloat16)
    delta = torch.randn(T, H, generator=g).to(torch.bfloat16)
    if groups:
        weight = (1 + 0.1 * torch.randn(groups, H, generator=g)).to(torch.bfloat16)
        row_group = torch.randint(0, groups, (T,), generator=g)
    else:
        weight, row_group = (1 + 0.1 * torch.randn(H, generator=g)).to(torch.bfloat16), None
    from droidspeak import _C
    total, normed = _C.add_rmsnorm(x, delta, weight, row_group, 1e-5)
    assert torch.equal(total, x + delta)
    assert torch.equal(normed, _C.rmsnorm(x + delta, weight, row_group, 1e-5))
    with pytest.raises(RuntimeError, match="delta must be"):
        _C.add_rmsnorm(x, delta[:, :8], weight, row_group, 1e-5)


def test_argmax_rows_matches_torch():
    # greedy sampling's argmax: the first maximum of each row, a NaN counting as the maximum
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 49157, generator=g)  # a tail past the 16-wide vectors
    x[1, 100] = x[1, 40000] = x[1].max() + 1  # a tie: the first wins
    x[2, 49156] = 50.0                          # the maximum in the scalar tail
    x[3, 7] = float("nan")
    x[3, 30000] = float("nan")
    x[4] = float("-inf")
    from droidspeak import _C
    got = _C.argmax_rows(x)
    assert torch.equal(got, x.max(-1).indices)
    assert got.tolist()[1:4] == [100, 49156, 7]
    strided = torch.randn(8, 3, generator=g).t()  # columns of rows: the wrapper makes them contiguous
    assert torch.equal(kernels.argmax_rows(strided), strided.max(-1).indices)
    with pytest.raises(RuntimeError, match="float32"):
        _C.argmax_rows(x.to(torch.bfloat16))


def test_silu_and_mul_matches_reference():
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(7, 2 * 1536, generator=g) * 4).to(torch.bfloat16)
    from droidspeak import _C
    got = _C.silu_and_mul(gate_up)
    want = reference.silu_and_mul(gate_up)
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)
    assert (got != want).float().mean() < 0.01
    with pytest.raises(RuntimeError, match="gate_up"):
        _C.silu_and_mul(gate_up[:, :5])


def test_vector_paths_without_amx():
    """CPUs without AMX (and DROIDSPEAK_NO_AMX=1) run decode attention and the
    grouped linear on AVX-512 instead of tiles, and short extends through the
    blocked kernel: the same reference comparisons,
    in a process where the tile state is never requested."""
    pytest_without_amx(__file__, "(decode_attention or extend_attention or grouped_linear) and not uses_amx")
