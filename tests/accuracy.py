"""Error bounds for the softmax attention momentkv computes, derived from the computation, not measured.

A check of the form "within k units in the last place of what SDPA gives" depends on how SDPA rounds, which
differs per CPU vector path (AVX2, AVX-512, none) and per thread count: it fails on the next machine. Here
the computed attention is compared with a float64 reference, and the allowance is a standard worst-case
rounding bound for the algorithm momentkv runs (:func:`momentkv.core.group_attention.attend` and every
path built on it), valid for any summation order, with or without FMA, on any IEEE CPU.

The derivation, per query head and query row. Inputs ``q`` (d), keys ``k_j`` and values ``v_j`` (S of
them), scale ``c``; every input is first converted exactly to float32, whose unit roundoff is
``u = 2^-24``; ``gamma(n) = n u / (1 - n u)`` bounds the relative error of an n-term sum or dot product
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sec. 3.1, any order of the terms).

1. Logits ``s_j = fl(fl(q . k_j) * c)``: ``|ŝ_j - s_j| <= gamma(d + 1) a_j`` with ``a_j = c sum_i |q_i k_ji|``.
2. Softmax: ``x_j = fl(ŝ_j - m)`` (``m`` the computed maximum: a shift common to every j, which the softmax
   ignores) adds ``u |ŝ_j - m| <= 2 u A (1 + gamma(d + 1))`` with ``A = max_j a_j`` (allowed keys only). So each
   exponent is off by at most ``D = gamma(d + 1) A + 2 u A (1 + gamma(d + 1))``. ``exp`` has a relative error
   of at most ``E = EXP_ULPS * 2u`` (an ulp is at most ``2u`` relative); the sum of the S exponentials adds
   ``gamma(S - 1)``; the normalisation one division, or a reciprocal and a product (``(1 + u)^2``). Hence
   ``|p̂_j / p_j - 1| <= rho = e^(2D) (1 + E)(1 + u)^2 / ((1 - E)(1 - gamma(S - 1))) - 1`` (the exponent errors
   shift ``p_j`` by ``e^(delta_j - delta-bar)``, at most ``e^(2D)``).
3. Output ``o = sum_j p_j v_j`` (float32, S terms): ``|ô - o| <= (rho + gamma(S)(1 + rho)) sum_j p_j |v_j|``.
4. Rounding ``ô`` to the output dtype (unit roundoff ``u_out``, 0 when it stays float32) adds
   ``u_out (|o| + err)``.
5. The float64 reference obeys the same bound with ``u = 2^-53``; it is added.

Exponentials that underflow lose their relative accuracy but each is below ``2^-126`` (with or without
flushing subnormals), so ``S 2^-126 max|v|`` is added to the output's bound and ``2^-126`` to each
probability's. ``EXP_ULPS = 20``: ATen's vectorised float32 ``exp`` is Sleef's 1-ulp one or, in some kernels,
``exp_u20`` (documented as 20 ulp); taking the worse keeps the bound valid for either.

The bound scales as ``(d A + S) u`` times ``sum_j p_j |v_j|``: a few hundred float32 units for the shapes the
tests use, far below a real defect (a wrong scale, mask or head mapping moves outputs by percents).
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
                 torch.bfloat16: 2.0**-8}
EXP_ULPS = 20
_TINY = 2.0**-126  # the smallest normal float32


def gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of an n-term sum or dot product."""
    if n * u >= 1:
        raise ValueError(f"n u = {n * u} >= 1: no bound")
    return n * u / (1 - n * u)


def _allowed(mask, shape) -> torch.Tensor:
    """A bool mask (True = attend), an additive one (0 = attend, a huge negative = masked) or None."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    if mask.dtype == torch.bool:
        return mask.expand(shape)
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if bool((mask[~blocked] != 0).any()):
        raise ValueError("an additive mask must hold 0 (attend) or a huge negative number (masked)")
    return (~blocked).expand(shape)


def _per_head(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask):
    """float64 ``q (b, H, q, d)``, ``k, v (b, H, S, d)`` expanded per query head, ``allowed (b, H, q, S)``."""
    heads = query.shape[1]
    groups = heads // key.shape[1]
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    b, _, q, _ = query.shape
    return query.double(), k, v, _allowed(mask, (b, heads, q, key.shape[2]))


def attention_reference(query, key, value, mask, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 softmax attention: ``out (b, q, H, d)`` (the layout ``attend`` returns) and ``probs (b, H, q, S)``."""
    q, k, v, allowed = _per_head(query, key, value, mask)
    logits = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return (probs @ v).transpose(1, 2), probs


def _bounds(q, k, v, allowed, probs, out, scaling, u, u_out):
    d, s = q.shape[-1], k.shape[-2]
    a = (q.abs() @ k.abs().transpose(-1, -2)) * abs(scaling)  # a_j, (b, H, q, S)
    big_a = a.masked_fill(~allowed, 0).amax(dim=-1, keepdim=True)  # A per row
    g = gamma(d + 1, u)
    drift = g * big_a + 2 * u * big_a * (1 + g)  # D
    e = EXP_ULPS * 2 * u
    rho = torch.exp(2 * drift) * (1 + e) * (1 + u) ** 2 / ((1 - e) * (1 - gamma(max(s - 1, 1), u))) - 1
    prob_bound = rho * probs + _TINY
    weighted = probs @ v.abs()  # sum_j p_j |v_j|, (b, H, q, d)
    out_err = (rho + gamma(s, u) * (1 + rho)) * weighted + s * _TINY * v.abs().amax(dim=(-2, -1), keepdim=True)
    out_err = out_err + u_out * (out.transpose(1, 2).abs() + out_err)
    return out_err.transpose(1, 2), prob_bound


def attention_error_bounds(query, key, value, mask, scaling: float, out_dtype: torch.dtype,
                           compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Worst-case distance of a computed attention from :func:`attention_reference` (see the module docstring).

    Args:
        query ``(b, H, q, d)``, key and value ``(b, kv, S, d)`` as the computation received them (in the model's
        dtype); mask bool (True = attend), additive or None, broadcastable to ``(b, H, q, S)``.
        out_dtype: the dtype the output is rounded to; compute_dtype: the dtype of the arithmetic.

    Returns:
        float64 bounds on ``|out - reference out|`` ``(b, q, H, d)`` and on ``|probs - reference probs|``
        ``(b, H, q, S)``, the reference's own rounding included.
    """
    q, k, v, allowed = _per_head(query, key, value, mask)
    out, probs = attention_reference(query, key, value, mask, scaling)
    u = UNIT_ROUNDOFF[compute_dtype]
    u_out = 0.0 if out_dtype == compute_dtype else UNIT_ROUNDOFF[out_dtype]
    ours = _bounds(q, k, v, allowed, probs, out, scaling, u, u_out)
    reference = _bounds(q, k, v, allowed, probs, out, scaling, UNIT_ROUNDOFF[torch.float64], 0.0)
    return ours[0] + reference[0], ours[1] + reference[1]


def group_mean_bound(probs: torch.Tensor, bound: torch.Tensor, groups: int,
                     compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference and bound for the mean over each KV head's ``groups`` query heads of probabilities
    ``(b, H, ...)`` (a sum of ``groups`` terms and a product by ``1 / groups``: ``gamma(groups + 1)``)."""
    b, h = probs.shape[:2]
    mean = probs.reshape(b, h // groups, groups, *probs.shape[2:]).mean(2)
    spread = bound.reshape(b, h // groups, groups, *probs.shape[2:]).mean(2)
    return mean, spread + gamma(groups + 1, UNIT_ROUNDOFF[compute_dtype]) * (mean + spread)


def excess(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> float:
    """The largest ``|actual - expected| / bound``: at most 1 when ``actual`` honours the bound."""
    return float(((actual.double() - expected).abs() / bound).max())


def assert_within_bound(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, name: str = "output"):
    """``|actual - expected| <= bound`` elementwise; the message names the worst element and how far it is."""
    assert actual.shape == expected.shape == bound.shape, (actual.shape, expected.shape, bound.shape)
    assert bool(torch.isfinite(actual).all()), f"{name}: not finite"
    err = (actual.double() - expected).abs()
    worst = int((err / bound).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert bool((err <= bound).all()), (
        f"{name}: {int((err > bound).sum())}/{err.numel()} elements beyond the rounding bound; worst at {index}: "
        f"error {float(err[index]):.3g}, bound {float(bound[index]):.3g}"
    )
