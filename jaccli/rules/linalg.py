"""Matrix products: Gemm and MatMul, written for BLAS (directions and samples folded into rows)."""

from __future__ import annotations

import numpy as np

from . import rule
from ..errors import UnsupportedOpError
from ._util import add, expand, unbroadcast


def _t(M, flag=True):
    return np.swapaxes(M, -1, -2) if flag else M


@rule("Gemm", since=7)
class Gemm:
    """Y = alpha * A' @ B' + beta * C, with A' = A^T if transA, B' = B^T if transB."""

    keeps = True

    def forward(A, B, C=None, *, alpha, beta, transA, transB):
        Y = _t(A, transA) @ _t(B, transB)
        if alpha != 1:
            Y = Y * Y.dtype.type(alpha)
        if C is not None:
            Y = Y + Y.dtype.type(beta) * C if beta != 1 else Y + C
        return Y

    def jvp(cx, Adot, Bdot, Cdot=None, *, alpha, beta, transA, transB):
        A, B = cx.x[0], cx.x[1]
        Y = cx.y[0]
        AB = add(
            None if Adot is None else _t(Adot, transA) @ _t(B, transB),
            None if Bdot is None else _t(A, transA) @ _t(Bdot, transB),
        )
        if AB is not None and alpha != 1:
            AB = AB * Y.dtype.type(alpha)
        if Cdot is not None:
            lead = Cdot.ndim - cx.x[2].ndim
            Cdot = expand(Cdot * Y.dtype.type(beta), cx.x[2], Y, lead)
        return add(AB, Cdot)

    def vjp(cx, Ybar, *, alpha, beta, transA, transB):
        # Ybar: (*lead, M, N); A': (M, K); B': (K, N)
        A, B = cx.x[0], cx.x[1]
        lead = cx.lead(Ybar)
        if alpha != 1:
            Ybar_a = Ybar * Ybar.dtype.type(alpha)
        else:
            Ybar_a = Ybar
        Abar = Bbar = Cbar = None
        if cx.need[0]:
            Abar = _t(Ybar_a @ _t(_t(B, transB)), transA)
        if cx.need[1]:
            Ap = _t(A, transA)
            if cx.keep[1]:  # per sample m: outer(A'[m], Ybar[m]) -> (*lead, M, K, N)
                Bp = np.einsum("mk,...mn->...mkn", Ap, Ybar_a)
            else:
                Bp = _t(Ap) @ Ybar_a
            Bbar = _t(Bp, transB)
        if len(cx.x) > 2 and cx.x[2] is not None and cx.need[2]:
            Cbar = unbroadcast(Ybar * Ybar.dtype.type(beta), cx.x[2].shape, lead, cx.keep[2])
        return Abar, Bbar, Cbar


@rule("MatMul", since=1)
class MatMul:
    """Y = A @ B with numpy semantics (batched, broadcasting, 1-D operands promoted)."""

    keeps = True

    def forward(A, B):
        return np.matmul(A, B)

    def jvp(cx, Adot, Bdot):
        A, B = cx.x
        return add(
            None if Adot is None else _mm(Adot, B, a_tan=True),
            None if Bdot is None else _mm(A, Bdot, b_tan=True),
        )

    def vjp(cx, Ybar):
        A, B = cx.x
        lead = cx.lead(Ybar)
        A2 = A[None, :] if A.ndim == 1 else A
        B2 = B[:, None] if B.ndim == 1 else B
        Yb = Ybar
        if B.ndim == 1:
            Yb = Yb[..., None]
        if A.ndim == 1:
            Yb = Yb[..., None, :]
        Abar = Bbar = None
        if cx.need[0]:
            G = Yb @ _t(B2)  # (*lead, *batch, M, K)
            Abar = _fit(G, A, A2, lead, cx.keep[0], B2, Yb, side=0)
        if cx.need[1]:
            G = None if (cx.keep[1] and A2.ndim == 2) else _t(A2) @ Yb  # (*lead, *batch, K, N)
            Bbar = _fit(G, B, B2, lead, cx.keep[1], A2, Yb, side=1)
        return Abar, Bbar


def _fit(G, X, X2, lead, keep, other, Yb, side):
    """Reduce a MatMul operand cotangent G to X's shape; per sample when `keep`.

    When the batched operand is a plain matrix, its rows are the samples and a per-sample
    cotangent is an outer product per row (as in Gemm); otherwise the samples are the first
    batch axis and unbroadcast keeps it.
    """
    head = Yb.shape[:lead]
    if keep and other.ndim == 2:
        if side == 0:  # A @ B with B a batched matrix contracts over the samples
            raise UnsupportedOpError("MatMul: a parameter times a batched matrix mixes samples; no per-sample cotangent")
        G = np.einsum("mk,...mn->...mkn", other, Yb)  # A rows are samples: Bbar[m] = outer(A[m], Ybar[m])
        return G.reshape(head + (G.shape[lead],) + X.shape)
    R = unbroadcast(G, X2.shape, lead, keep)
    return R.reshape(head + ((R.shape[lead],) if keep else ()) + X.shape)


def _mm(A, B, a_tan=False, b_tan=False):
    """matmul where one operand is a tangent with leading axes; 1-D primal operands promoted."""
    if b_tan and A.ndim == 1:
        return np.squeeze(A[None, :] @ B, axis=-2)
    if a_tan and B.ndim == 1:
        return (A @ B[:, None])[..., 0]
    return A @ B
