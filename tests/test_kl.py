import pytest
import torch
import torch.nn.functional as F

from common import kl_from_hidden, token_logprobs_from_hidden

ATOL = 1e-5


def kl_per_token(zs, zt, chunk_size=1024, vocab_size=None):
    """The chunked KL on logits (..., T, V): kl_from_hidden with identity output matrices, whose hidden states are the
    logits themselves."""
    eye_s, eye_t = (torch.eye(z.shape[-1], dtype=z.dtype, device=z.device) for z in (zs, zt))
    tokens = torch.zeros(zs.shape[:-1], dtype=torch.long, device=zs.device)
    return kl_from_hidden(zs, eye_s, zt, eye_t, tokens, chunk_size, vocab_size)[0]


def token_logprobs(z, tokens, chunk_size=1024):
    """log_softmax(z) gathered at tokens, chunked, through token_logprobs_from_hidden with an identity matrix."""
    return token_logprobs_from_hidden(z, torch.eye(z.shape[-1], dtype=z.dtype, device=z.device), tokens, chunk_size)


def _naive_kl(zs, zt):
    """Reference reverse KL in float64 on the common vocab prefix."""
    v = min(zs.shape[-1], zt.shape[-1])
    ls = F.log_softmax(zs[..., :v].double(), -1)
    lt = F.log_softmax(zt[..., :v].double(), -1)
    return (ls.exp() * (ls - lt)).sum(-1)


def _naive_lp(z, y):
    return F.log_softmax(z.double(), -1).gather(-1, y[..., None])[..., 0]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=_gen(seed)) * scale


def test_kl_matches_naive_float64():
    zs, zt = _logits(37, 101, seed=1), _logits(37, 101, seed=2)
    kl = kl_per_token(zs, zt, chunk_size=8)
    assert kl.dtype == torch.float32 and kl.shape == (37,)
    torch.testing.assert_close(kl.double(), _naive_kl(zs, zt), atol=ATOL, rtol=0)


def test_kl_nonnegative_and_zero_for_identical():
    zs, zt = _logits(64, 50, seed=3), _logits(64, 50, seed=4)
    assert (kl_per_token(zs, zt) >= 0).all()
    torch.testing.assert_close(kl_per_token(zs, zs.clone()), torch.zeros(64), atol=1e-6, rtol=0)


def test_kl_vocab_width_mismatch():
    zs, zt = _logits(2, 9, 70, seed=5), _logits(2, 9, 83, seed=6)  # teacher wider (like 7B vs 1.5B)
    for a, b in ((zs, zt), (zt, zs)):
        got = kl_per_token(a, b, chunk_size=4)
        torch.testing.assert_close(got.double(), _naive_kl(a[..., :70], b[..., :70]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 1024])
def test_chunked_equals_unchunked_values_and_grads(chunk):
    zt = _logits(3, 16, 40, seed=8)
    up = torch.randn(3, 16, generator=_gen(9))
    grads = []
    for c in (chunk, 10**6):
        zs = _logits(3, 16, 45, seed=7).requires_grad_()
        kl = kl_per_token(zs, zt, chunk_size=c)
        (kl * up).sum().backward()
        grads.append((kl.detach(), zs.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=0)
    assert (grads[0][1][..., 40:] == 0).all()  # columns beyond the common vocab get no gradient


def test_kl_grad_matches_autograd_of_naive():
    zs = _logits(11, 30, seed=10).double().requires_grad_()
    zt = _logits(11, 30, seed=11).double()
    up = torch.randn(11, generator=_gen(12), dtype=torch.float64)
    (g,) = torch.autograd.grad((kl_per_token(zs, zt, 4) * up).sum(), zs)
    (ref,) = torch.autograd.grad((_naive_kl(zs, zt) * up).sum(), zs)
    torch.testing.assert_close(g, ref, atol=1e-10, rtol=0)


def test_token_logprobs_matches_naive_and_grad():
    z = _logits(2, 13, 57, seed=13).requires_grad_()
    y = torch.randint(0, 57, (2, 13), generator=_gen(14))
    lp = token_logprobs(z, y, chunk_size=5)
    assert lp.shape == (2, 13) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), _naive_lp(z.detach(), y), atol=ATOL, rtol=0)
    up = torch.randn(2, 13, generator=_gen(15))
    (g,) = torch.autograd.grad((lp * up).sum(), z)
    (ref,) = torch.autograd.grad((_naive_lp(z, y) * up.double()).sum(), z)
    torch.testing.assert_close(g, ref.float(), atol=ATOL, rtol=0)


def test_batch_dims_and_padding():
    b, t, v = 3, 10, 33
    zs = _logits(b, t, v, seed=16).requires_grad_()
    zt = _logits(b, t, v, seed=17)
    y = torch.randint(0, v, (b, t), generator=_gen(18))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:] = False
    kl, lp = kl_per_token(zs, zt, 4), token_logprobs(zs, y.masked_fill(~mask, -100), 4)
    for i in range(b):  # each row computed alone gives the same answer
        torch.testing.assert_close(kl[i], kl_per_token(zs[i], zt[i]), atol=1e-6, rtol=0)
    torch.testing.assert_close(lp[mask].double(), _naive_lp(zs.detach(), y)[mask], atol=ATOL, rtol=0)
    assert (lp[~mask] == 0).all()  # negative (ignored) tokens give 0
    (kl * mask + lp).sum().backward()
    assert (zs.grad[~mask] == 0).all() and (zs.grad[mask].abs().sum(-1) > 0).all()


def _hidden_case(hs_dim, ht_dim, vs, vt, shape=(2, 9), seed=20, dtype=torch.float32):
    g = _gen(seed)
    hs = torch.randn(*shape, hs_dim, generator=g, dtype=dtype)
    ws = torch.randn(vs, hs_dim, generator=g, dtype=dtype) / hs_dim**0.5 * 2
    ht = torch.randn(*shape, ht_dim, generator=g, dtype=dtype)
    wt = torch.randn(vt, ht_dim, generator=g, dtype=dtype) / ht_dim**0.5 * 2
    y = torch.randint(0, min(vs, vt), shape, generator=g)
    return hs, ws, ht, wt, y


@pytest.mark.parametrize("dims", [(16, 16, 50, 50), (12, 20, 47, 61), (20, 8, 64, 41)])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_kl_from_hidden_matches_logits_path(dims, chunk):
    hs, ws, ht, wt, y = _hidden_case(*dims)
    up_kl, up_lp = torch.randn(2, 9, generator=_gen(21)), torch.randn(2, 9, generator=_gen(22))
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    kl, lps = kl_from_hidden(hs1, ws1, ht, wt, y, chunk_size=chunk)
    assert kl.shape == lps.shape == (2, 9)
    ((kl * up_kl).sum() + (lps * up_lp).sum()).backward()
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    v = min(ws.shape[0], wt.shape[0])  # student log-probs use the same cut softmax as the KL
    zs, zt = (hs2 @ ws2.T)[..., :v], (ht @ wt.T)[..., :v]
    kl_ref = kl_per_token(zs, zt)
    lps_ref = token_logprobs(zs, y)
    ((kl_ref * up_kl).sum() + (lps_ref * up_lp).sum()).backward()
    torch.testing.assert_close(kl, kl_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(lps, lps_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(kl.double(), _naive_kl(zs.detach(), zt), atol=ATOL, rtol=0)
    torch.testing.assert_close(hs1.grad, hs2.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(ws1.grad, ws2.grad, atol=ATOL, rtol=0)


def test_kl_from_hidden_gradcheck_float64():
    hs, ws, ht, wt, y = _hidden_case(5, 7, 11, 13, shape=(2, 3), dtype=torch.float64)
    hs.requires_grad_(), ws.requires_grad_()

    def f(h, w):
        return kl_from_hidden(h, w, ht, wt, y, chunk_size=2)

    assert torch.autograd.gradcheck(f, (hs, ws))
    zt = (ht @ wt.T).detach()
    assert torch.autograd.gradcheck(lambda z: kl_per_token(z, zt, 4), ((hs @ ws.T).detach().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, y, 4), ((hs @ ws.T).detach().requires_grad_(),))


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_bf16(device):
    hs, ws, ht, wt, y = (x.to(device) for x in _hidden_case(64, 96, 1000, 1100, shape=(2, 300)))
    up_kl, up_lp = (torch.randn(2, 300, generator=_gen(s)).to(device) for s in (23, 24))
    b = [x.bfloat16() for x in (hs, ws, ht, wt)]
    b[0].requires_grad_(), b[1].requires_grad_()
    kl, lps = kl_from_hidden(*b, y, chunk_size=128)
    assert kl.dtype == lps.dtype == torch.float32
    ((kl * up_kl).sum() + (lps * up_lp).sum()).backward()
    assert b[0].grad.dtype == b[1].grad.dtype == torch.bfloat16
    # reference: same bf16-rounded inputs, float32 full-logits path
    hs2, ws2 = b[0].detach().float().requires_grad_(), b[1].detach().float().requires_grad_()
    zs, zt = hs2 @ ws2.T, b[2].float() @ b[3].float().T
    kl_ref, lps_ref = kl_per_token(zs, zt), token_logprobs(zs, y)
    ((kl_ref * up_kl).sum() + (lps_ref * up_lp).sum()).backward()
    torch.testing.assert_close(kl, kl_ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lps, lps_ref, atol=3e-2, rtol=3e-2)
    for g, ref in ((b[0].grad, hs2.grad), (b[1].grad, ws2.grad)):  # bf16 logits: a few-% error is expected
        assert ((g.float() - ref).norm() / ref.norm()).item() < 2e-2
    assert (kl_per_token(zs.bfloat16(), zt.bfloat16(), 100) >= -1e-6).all()


def test_kl_over_the_tokenizers_ids_only():
    """With vocab_size, both softmaxes run over the tokenizer's real ids, whatever the matrices' widths: padding
    rows (Qwen2.5: 271 of them in the 1.5B's matrix) never enter the distributions."""
    zs, zt = _logits(2, 9, 70, seed=5), _logits(2, 9, 83, seed=6)
    zt[..., 60:] += 8.0  # mass on the teacher's padding rows: it must not count
    got = kl_per_token(zs, zt, chunk_size=4, vocab_size=60)
    torch.testing.assert_close(got.double(), _naive_kl(zs[..., :60], zt[..., :60]), atol=ATOL, rtol=0)
    assert not torch.allclose(got, kl_per_token(zs, zt, chunk_size=4), atol=1e-2)  # min(V_s, V_t) = 70 would differ
    hs, ht = torch.randn(2, 9, 16, generator=_gen(1)), torch.randn(2, 9, 24, generator=_gen(2))
    ws, wt = torch.randn(70, 16, generator=_gen(3)), torch.randn(83, 24, generator=_gen(4))
    tokens = torch.randint(0, 60, (2, 9), generator=_gen(5))
    kl, lp = kl_from_hidden(hs, ws, ht, wt, tokens, chunk_size=5, vocab_size=60)
    torch.testing.assert_close(kl.double(), _naive_kl((hs @ ws.T)[..., :60], (ht @ wt.T)[..., :60]), atol=ATOL, rtol=0)
    torch.testing.assert_close(lp.double(), _naive_lp((hs @ ws.T)[..., :60], tokens), atol=ATOL, rtol=0)


def test_backward_without_kl_gradient_skips_the_teacher_and_stays_exact(monkeypatch):
    """GRPO and non-violators: only the log-probs carry gradient; the backward then never recomputes the teacher's
    chunk logits (counted: every chunk's logits pass through common._logits), recomputes them for the chunks whose
    KL carries gradient only, and the gradient equals the naive log-softmax's."""
    import common

    hs, ht = torch.randn(3, 5, 8, generator=_gen(1)).requires_grad_(), torch.randn(3, 5, 12, generator=_gen(2))
    ws, wt = torch.randn(30, 8, generator=_gen(3)).requires_grad_(), torch.randn(30, 12, generator=_gen(4))
    tokens = torch.randint(0, 30, (3, 5), generator=_gen(5))
    logits, calls = common._logits, []

    def spy(h, w, v):  # records whose logits each call computes: the teacher's (True) or the student's (False)
        calls.append(w.data_ptr() == wt.data_ptr())
        return logits(h, w, v)

    monkeypatch.setattr(common, "_logits", spy)
    kl, lp = kl_from_hidden(hs, ws, ht, wt, tokens, chunk_size=4)  # 15 positions: chunks of 4, 4, 4 and 3
    assert calls == [False, True] * 4  # the forward computes both
    calls.clear()
    (lp.sum() + 0.0 * kl.sum()).backward(retain_graph=True)
    assert calls == [False] * 4  # the student's logits of each chunk, never the teacher's
    hs2, ws2 = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    _naive_lp(hs2 @ ws2.T, tokens).sum().backward()
    torch.testing.assert_close(hs.grad.double(), hs2.grad.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ws.grad.double(), ws2.grad.double(), atol=1e-5, rtol=0)
    calls.clear()
    (lp.sum() + kl.reshape(-1)[5]).backward()  # the KL of one position in the second chunk carries gradient
    assert calls == [False, False, True, False, False]  # the teacher's logits of that chunk only


def test_backward_recomputes_the_logits_of_the_forward_under_its_autocast(monkeypatch):
    """Under bf16 autocast the forward's chunk logits come from bf16 matmuls; the backward, which runs outside the
    autocast context, must recompute those same logits (not float32 ones), or the gradient would be that of another
    function than the KL the loss used."""
    import common

    hs, ws = torch.randn(2, 6, 8, generator=_gen(1)).requires_grad_(), torch.randn(30, 8, generator=_gen(2))
    ht, wt = torch.randn(2, 6, 12, generator=_gen(3)), torch.randn(30, 12, generator=_gen(4))
    tokens = torch.randint(0, 30, (2, 6), generator=_gen(5))
    logits, seen = common._logits, []

    def spy(h, w, v):
        z = logits(h, w, v)
        seen.append((torch.is_autocast_enabled("cpu"), (h.to(w.dtype) @ w[:v].t()).dtype))
        return z

    monkeypatch.setattr(common, "_logits", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl, lp = kl_from_hidden(hs, ws, ht, wt, tokens, chunk_size=4)
    forward, seen[:] = list(seen), []
    (kl.sum() + lp.sum()).backward()
    assert forward and set(forward) == {(True, torch.bfloat16)}
    assert seen and set(seen) == {(True, torch.bfloat16)}  # the same precision as the forward's
    seen.clear()
    kl, lp = kl_from_hidden(hs, ws, ht, wt, tokens, chunk_size=4)  # without autocast: float32 both ways
    (kl.sum() + lp.sum()).backward()
    assert set(seen) == {(False, torch.float32)}
