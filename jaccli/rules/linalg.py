"""Matrix products: Gemm and MatMul, written for BLAS (directions and samples folded into rows)."""

from __future__ import annotations

import numpy as np

from . import rule
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
            Abar = unbroadcast(G, A2.shape, lead, cx.keep[0]).reshape(Ybar.shape[:lead] + ((Ybar.shape[lead],) if cx.keep[0] else ()) + A.shape)
        if cx.need[1]:
            G = _t(A2) @ Yb  # (*lead, *batch, K, N)
            Bbar = unbroadcast(G, B2.shape, lead, cx.keep[1]).reshape(Ybar.shape[:lead] + ((Ybar.shape[lead],) if cx.keep[1] else ()) + B.shape)
        return Abar, Bbar


def _mm(A, B, a_tan=False, b_tan=False):
    """matmul where one operand is a tangent with leading axes; 1-D primal operands promoted."""
    if b_tan and A.ndim == 1:
        return np.squeeze(A[None, :] @ B, axis=-2)
    if a_tan and B.ndim == 1:
        return (A @ B[:, None])[..., 0]
    return A @ B
