import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Exact per-token reverse KL(student || teacher), computed a chunk of positions
# at a time. Why: with Qwen's 151,936-token vocabulary, full [tokens x vocab]
# float32 logits for 16k tokens are ~10 GB per copy, and a naive autograd graph
# keeps several such copies (logits, log-softmax, probs, ...) alive for backward.
# Every path below saves only its inputs and recomputes each chunk in backward,
# so extra memory is O(chunk x vocab) plus the gradients themselves.
# ---------------------------------------------------------------------------


def _logits(h, w, v):
    """Chunk logits (n, v) in >= float32: h (n, H) @ w[:v].T, or h[:, :v] if w is None (h are logits)."""
    z = h[:, :v] if w is None else h.to(w.dtype) @ w[:v].t()  # matmul stays in the input dtype (bf16 speed)
    return z.to(torch.promote_types(z.dtype, torch.float32))  # softmax in fp32; fp64 kept for gradcheck


def _chunk(hs, ws, ht, wt, y, v):
    """One chunk -> (p_s (n, v), ls - lt (n, v) or None, kl (n,), lp_s (n,), lp_t (n,))."""
    ls = F.log_softmax(_logits(hs, ws, v), -1)
    p = ls.exp()
    zero = ls.new_zeros(ls.shape[0])
    d, kl, lps, lpt = None, zero, zero, zero
    idx, ok = (None, None) if y is None else (y.clamp(min=0)[:, None], y >= 0)  # y < 0: ignored (padding)
    if y is not None:
        lps = ls.gather(1, idx)[:, 0] * ok
    if ht is not None:
        lt = F.log_softmax(_logits(ht, wt, v), -1)
        if y is not None:
            lpt = lt.gather(1, idx)[:, 0] * ok
        d = lt.neg_().add_(ls)  # reuse lt's buffer: d = log p_s - log p_t
        kl = (p * d).sum(-1)  # elementwise, not bmm: a TF32-enabled matmul would cost KL precision
    return p, d, kl, lps, lpt


class _ChunkedKL(torch.autograd.Function):
    """hs (N, H_s) with ws (V_s, H_s), or student logits hs (N, V_s) with ws None; teacher likewise (may be
    None); tokens (N,) long or None. Returns kl, lp_s, lp_t, each (N,). Saves only the inputs; backward
    recomputes every chunk's logits, so activation memory is O(chunk x vocab), never O(N x vocab)."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, tokens, chunk, v):
        outs = [torch.cat(o) for o in zip(*(
            _chunk(hs[i:i + chunk], ws, None if ht is None else ht[i:i + chunk], wt,
                   None if tokens is None else tokens[i:i + chunk], v)[2:]
            for i in range(0, max(hs.shape[0], 1), chunk)))]  # max: an empty input still yields outputs
        ctx.save_for_backward(hs, ws, ht, wt, tokens)
        ctx.chunk, ctx.v = chunk, v
        ctx.mark_non_differentiable(outs[2])  # teacher logprobs are constants
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_kl, g_lp, _):
        hs, ws, ht, wt, y = ctx.saved_tensors
        chunk, v = ctx.chunk, ctx.v
        need_h, need_w = ctx.needs_input_grad[0], ws is not None and ctx.needs_input_grad[1]
        gh = torch.zeros_like(hs) if need_h else None  # zeros: logit columns >= v get no gradient
        # fp32 accumulator so many bf16 chunk products do not lose precision when summed
        gw = torch.zeros(ws.shape, dtype=torch.promote_types(ws.dtype, torch.float32), device=ws.device) \
            if need_w else None
        for i in range(0, hs.shape[0], chunk):
            sl = slice(i, i + chunk)
            yc = None if y is None else y[sl]
            p, d, kl, _, _ = _chunk(hs[sl], ws, None if ht is None else ht[sl], wt, yc, v)
            # dKL/dz = p * (d - KL);  d lp(y)/dz = onehot(y) - p  ->  dz = p * (gk (d - KL) - gl) + gl onehot(y)
            gz = torch.zeros_like(p) if d is None else d.sub_(kl[:, None]).mul_(g_kl[sl, None].to(p.dtype))
            if y is not None:
                gl = g_lp[sl].to(p.dtype) * (yc >= 0)
                gz.sub_(gl[:, None]).mul_(p).scatter_add_(1, yc.clamp(min=0)[:, None], gl[:, None])
            else:
                gz.mul_(p)
            if ws is None:  # logits mode: gradient w.r.t. the logits themselves
                if need_h:
                    gh[sl, :v] = gz.to(hs.dtype)
                continue
            gzc = gz.to(ws.dtype)
            if need_h:
                gh[sl] = (gzc @ ws[:v]).to(hs.dtype)
            if need_w:
                hc = hs[sl].to(ws.dtype)
                if gw.dtype == ws.dtype:
                    gw[:v].addmm_(gzc.t(), hc)  # in place: no (V, H) temp
                else:
                    gw[:v] += gzc.t() @ hc  # bf16 GEMM speed, fp32 accumulation across chunks
        return gh, None if gw is None else gw.to(ws.dtype), None, None, None, None, None


def _flat(x):
    return x.reshape(-1, x.shape[-1])  # a view for contiguous inputs; vocab cut happens per chunk (no copy)


def kl_per_token(student_logits, teacher_logits, chunk_size: int = 1024):
    """Exact reverse KL(p_s || p_t) per position. student_logits (..., T, V_s), teacher_logits (..., T, V_t)
    -> (..., T) float32. Both cut to min(V_s, V_t) columns; teacher detached; chunk_size positions at a time."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    kl, _, _ = _ChunkedKL.apply(_flat(student_logits), None, _flat(teacher_logits.detach()), None, None,
                                chunk_size, v)
    return kl.reshape(student_logits.shape[:-1])


def token_logprobs(logits, tokens, chunk_size: int = 1024):
    """log_softmax(logits) (..., T, V) gathered at tokens (..., T) -> (..., T) float32; differentiable.
    Tokens < 0 (padding) give 0 and no gradient."""
    _, lp, _ = _ChunkedKL.apply(_flat(logits), None, None, None, tokens.reshape(-1), chunk_size, logits.shape[-1])
    return lp.reshape(tokens.shape)


def kl_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, tokens,
                   chunk_size: int = 1024):
    """Exact reverse KL from final (post-norm) hidden states without materialising full logits.
    student_hidden (..., T, H_s), student_weight (V_s, H_s), teacher_hidden (..., T, H_t),
    teacher_weight (V_t, H_t), tokens (..., T) real ids < min(V_s, V_t) (< 0: padding, ignored).
    Returns (kl, student_logprobs, teacher_logprobs), each (..., T) float32; gradients flow through the
    first two to student_hidden and student_weight (in their dtypes); the teacher is constant."""
    v = min(student_weight.shape[0], teacher_weight.shape[0])
    outs = _ChunkedKL.apply(_flat(student_hidden), student_weight, _flat(teacher_hidden.detach()),
                            teacher_weight.detach(), tokens.reshape(-1), chunk_size, v)
    return tuple(o.reshape(tokens.shape) for o in outs)
