"""Matrix products: Gemm and MatMul, written for BLAS (directions and samples folded into rows)."""

from __future__ import annotations

import numpy as np

from . import rule
from ..errors import UnsupportedOpError
from ._util import add, expand, lead_flat, unbroadcast


def _t(M, flag=True):
    return np.swapaxes(M, -1, -2) if flag else M


def mm(A, B, small=1 << 18):
    """A @ B (numpy semantics) with the extra leading (direction) axes of one operand folded into
    the rows or columns of the other's products: one BLAS call for a matrix B, one per batch
    matrix for a batch of small ones (attention's per-head products), where numpy's matmul
    would make one call per direction and batch matrix."""
    if A.ndim >= 2 and B.ndim >= 2 and A.shape[-1] == 1 == B.shape[-2]:  # outer products: BLAS packs for nothing (3x)
        return A * B
    if B.ndim == 2 and A.ndim > 2:
        return (A.reshape(-1, A.shape[-1]) @ B).reshape(A.shape[:-1] + B.shape[-1:])
    if A.ndim > B.ndim > 2 and A.shape[A.ndim - B.ndim:-2] == B.shape[:-2] and A.shape[-2] * A.shape[-1] * B.shape[-1] <= small:
        L, batch, (M, K), N = A.shape[: A.ndim - B.ndim], B.shape[:-2], A.shape[-2:], B.shape[-1]
        Am = np.moveaxis(A.reshape((-1,) + batch + (M, K)), 0, -3).reshape(batch + (-1, K))  # (*b, L*M, K)
        Y = (Am @ B).reshape(batch + (-1, M, N))
        return np.moveaxis(Y, -3, 0).reshape(L + batch + (M, N))
    if B.ndim > A.ndim > 2 and B.shape[B.ndim - A.ndim:-2] == A.shape[:-2] and A.shape[-2] * A.shape[-1] * B.shape[-1] <= small:
        L, batch, (K, M), N = B.shape[: B.ndim - A.ndim], A.shape[:-2], A.shape[-2:], B.shape[-1]
        b = len(batch)
        Bm = B.reshape((-1,) + batch + (M, N)).transpose(tuple(range(1, b + 2)) + (0, b + 2)).reshape(batch + (M, -1))
        Y = (A @ Bm).reshape(batch + (K, -1, N))  # (*b, K, L, N)
        return Y.transpose((b + 1,) + tuple(range(b)) + (b, b + 2)).reshape(L + batch + (K, N))
    return A @ B


def rows_into(G, W, dest):
    """G (T, n, M) @ W (M, K) written into dest (T, n, K). When dest is a transposed contiguous
    (n, T, K), the layout of a result (samples, then directions), it is one GEMM on G's rows
    taken sample by sample: a copy of G, not of the product."""
    D = dest.transpose(1, 0, 2)
    if D.flags.c_contiguous:
        n, T = D.shape[:2]
        np.matmul(G.transpose(1, 0, 2).reshape(n * T, -1), W, out=D.reshape(n * T, -1))
    else:
        np.matmul(G, W, out=dest)
    return dest


def per_sample_outer(A, G, trans, out=None):
    """Per-sample weight cotangents of Y = A @ W with samples as A's rows: A (M, K), G (*lead, M, N)
    -> (*lead, M, K, N), or (*lead, M, N, K) when W is stored transposed; written into `out`
    (a view into the result) when given: one pass over the memory, the bound of this step.

    einsum's product kernels write these faster than a broadcast multiply, whose inner loops
    are one row each, provided a call has no lead axis to stride over: one call per direction
    (2x); for a large weight, one call per sample and direction, whose rows lie together in
    the result (1.3-1.5x on memory already faulted in). Not for a small weight: with sample
    parts in two threads, many short calls write at half the rate of a few long ones."""
    M, K = A.shape
    lead, N = G.shape[:-2], G.shape[-1]
    if out is None:
        out = np.empty(lead + ((M, N, K) if trans else (M, K, N)), np.result_type(A, G))
    if lead and N * K >= _LARGE_OUTER:  # per sample and direction
        for m in range(M):
            for t in np.ndindex(*lead):
                np.einsum("n,k->nk" if trans else "n,k->kn", G[t + (m,)], A[m], out=out[t + (m,)])
        return out
    for t in np.ndindex(*lead):
        np.einsum("mn,mk->mnk" if trans else "mn,mk->mkn", G[t], A, out=out[t])
    return out


_LARGE_OUTER = 1 << 16  # values of one outer product from which each gets its own call


def grouped_outer(A, G, trans, out=None):
    """Per-sample weight cotangents of Y = A @ W where each sample has rows of its own in A:
    A (N, S, K) and G (*lead, N, S, M), a sample's S rows together (a batch axis, or Ctx.rows)
    -> (*lead, N, K, M), or (*lead, N, M, K) when W is stored transposed; one GEMM per sample
    (and direction) over its rows, written into `out` when it fits."""
    N, _, K = A.shape
    lead, M = G.shape[:-3], G.shape[-1]
    left, right = (_t(G), A) if trans else (_t(A), G)
    shape = lead + (N,) + ((M, K) if trans else (K, M))
    return np.matmul(left, right, out=out if out is not None and out.shape == shape else None)


def rows_summed(G, rows, lead):
    """A cotangent (*lead, N*rows, ...) summed over each sample's rows: (*lead, N, ...)."""
    return G.reshape(G.shape[:lead] + (-1, rows) + G.shape[lead + 1:]).sum(axis=lead + 1)


def _identity_rows(W, sel, alpha, rows_are_outputs):
    """Rows W[sel] (or columns, as rows) times alpha: the first cotangent of A for an identity seed."""
    R = W[sel] if rows_are_outputs else W[:, sel].T
    return R * R.dtype.type(alpha) if alpha != 1 else R


def _gemm_vjp_identity(cx, sel, *, alpha=1.0, beta=1.0, transA=0, transB=0, **_):
    """Gemm's VJP for the identity seed, when only A (samples as rows) needs a cotangent: row t is
    alpha * B'[:, sel[t]] for every sample, a broadcast view with no arithmetic. None otherwise."""
    if transA or any(cx.need[1:]) or not cx.need[0]:
        return None
    A, B = cx.x[0], cx.x[1]
    rows = _identity_rows(B, sel, alpha, bool(transB))  # (T, K)
    return (np.broadcast_to(rows[:, None, :], (len(sel),) + A.shape),) + (None,) * (len(cx.x) - 1)


@rule("Gemm", since=7)
class Gemm:
    """Y = alpha * A' @ B' + beta * C, with A' = A^T if transA, B' = B^T if transB."""

    keeps = True
    vjp_identity = _gemm_vjp_identity

    def grouped_rows(attrs):
        """Its per-sample cotangents follow rows grouped by sample (Ctx.rows) in A, not in A^T."""
        return not attrs.get("transA")

    def forward(A, B, C=None, *, alpha, beta, transA, transB):
        Y = mm(_t(A, transA), _t(B, transB))  # batched A: onnxruntime's FusedMatMul uses this forward
        if alpha != 1:
            Y = Y * Y.dtype.type(alpha)
        if C is not None:
            Y = Y + Y.dtype.type(beta) * C if beta != 1 else Y + C
        return Y

    def jvp(cx, Adot, Bdot, Cdot=None, *, alpha, beta, transA, transB):
        A, B = cx.x[0], cx.x[1]
        Y = cx.y[0]
        AB = add(
            None if Adot is None else mm(_t(Adot, transA), _t(B, transB)),
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
            dest = cx.dest(0)
            if dest is not None and not transA and Ybar_a.ndim == 3:
                Abar = rows_into(Ybar_a, _t(_t(B, transB)), dest)
            else:
                Abar = _t(mm(Ybar_a, _t(_t(B, transB))), transA)
        if cx.need[1]:
            Ap = _t(A, transA)
            if cx.keep[1] and cx.rows > 1:  # per sample: its rows of A' against its rows of Ybar
                R, K = Ap.shape
                Bbar = grouped_outer(Ap.reshape(R // cx.rows, cx.rows, K),
                                     Ybar_a.reshape(Ybar_a.shape[:lead] + (R // cx.rows, cx.rows, -1)), transB, cx.dest(1))
            elif cx.keep[1]:  # per sample m: outer(A'[m], Ybar[m]), in B's own layout
                Bbar = per_sample_outer(Ap, Ybar_a, transB, cx.dest(1))
            else:
                Bbar = _t(_t(Ap) @ Ybar_a, transB)
        if len(cx.x) > 2 and cx.x[2] is not None and cx.need[2]:
            Yc = Ybar * Ybar.dtype.type(beta)
            if cx.keep[2] and cx.rows > 1:
                Yc = rows_summed(Yc, cx.rows, lead)
            Cbar = unbroadcast(Yc, cx.x[2].shape, lead, cx.keep[2])
        return Abar, Bbar, Cbar


@rule("Gemm", since=1)
class Gemm1(Gemm):
    """Gemm of opsets 1-6: C required, `broadcast` says whether it broadcasts (numpy does either way)."""

    def forward(A, B, C, *, alpha=1.0, beta=1.0, broadcast=0, transA=0, transB=0):
        return Gemm.forward(A, B, C, alpha=alpha, beta=beta, transA=transA, transB=transB)

    def jvp(cx, Adot, Bdot, Cdot=None, *, alpha=1.0, beta=1.0, broadcast=0, transA=0, transB=0):
        return Gemm.jvp(cx, Adot, Bdot, Cdot, alpha=alpha, beta=beta, transA=transA, transB=transB)

    def vjp(cx, Ybar, *, alpha=1.0, beta=1.0, broadcast=0, transA=0, transB=0):
        return Gemm.vjp(cx, Ybar, alpha=alpha, beta=beta, transA=transA, transB=transB)


@rule("MatMul", since=1)
class MatMul:
    """Y = A @ B with numpy semantics (batched, broadcasting, 1-D operands promoted)."""

    keeps = True

    def grouped_rows(attrs):
        """Its per-sample cotangents follow rows grouped by sample (Ctx.rows) in a matrix A."""
        return True

    def vjp_identity(cx, sel):
        """For samples as the rows of a matrix A and a weight matrix B: rows B[:, sel]^T, broadcast."""
        A, B = cx.x
        if A.ndim != 2 or B.ndim != 2 or cx.need[1] or not cx.need[0]:
            return None
        return np.broadcast_to(_identity_rows(B, sel, 1.0, False)[:, None, :], (len(sel),) + A.shape), None

    def forward(A, B):
        return mm(A, B)  # a batch of rows by a weight matrix in one GEMM: np.matmul makes one call per batch entry

    def jvp(cx, Adot, Bdot):
        A, B = cx.x
        return add(
            None if Adot is None else _tangent_product(Adot, A, B, left=True),
            None if Bdot is None else _tangent_product(Bdot, B, A, left=False),
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
            G = mm(Yb, _t(B2))  # (*lead, *batch, M, K)
            Abar = _fit(G, A, A2, lead, cx.keep[0], B2, Yb, side=0)
        dest = cx.dest(1)
        if cx.need[1] and B.ndim == 2 and (A.ndim >= 3 or cx.rows > 1):
            # a weight applied across A's batch axes, or to a sample's rows one after another
            # (Ctx.rows): contract them with the rows, in one GEMM per sample or over all, never
            # a product per batch matrix summed after
            head, K, N = Yb.shape[:lead], A.shape[-1], B.shape[-1]
            if cx.keep[1]:
                n = A.shape[0] // cx.rows  # a batch axis or rows: each sample's cx.rows of them together
                Bbar = grouped_outer(A.reshape(n, -1, K), Yb.reshape(head + (n, -1, N)), False, dest)
            else:
                Bbar = A.reshape(-1, K).T @ Yb.reshape(head + (-1, N))
        elif cx.need[1]:
            G = None if (cx.keep[1] and A2.ndim == 2) else mm(_t(A2), Yb)  # (*lead, *batch, K, N)
            Bbar = _fit(G, B, B2, lead, cx.keep[1], A2, Yb, side=1, dest=dest)
        return Abar, Bbar


def _fit(G, X, X2, lead, keep, other, Yb, side, dest=None):
    """Reduce a MatMul operand cotangent G to X's shape; per sample when `keep`.

    When the batched operand is a plain matrix, its rows are the samples and a per-sample
    cotangent is an outer product per row (as in Gemm); otherwise the samples are the first
    batch axis and unbroadcast keeps it.
    """
    head = Yb.shape[:lead]
    if keep and other.ndim == 2:
        if side == 0:  # A @ B with B a batched matrix contracts over the samples
            raise UnsupportedOpError("MatMul: a parameter times a batched matrix mixes samples; no per-sample cotangent")
        G = per_sample_outer(other, Yb, False, dest if dest is not None and dest.shape == head + (other.shape[0],) + X.shape[-2:] and X.ndim == 2 else None)
        return G.reshape(head + (G.shape[lead],) + X.shape)
    R = unbroadcast(G, X2.shape, lead, keep)
    return R.reshape(head + ((R.shape[lead],) if keep else ()) + X.shape)


def _tangent_product(D, x, other, left):
    """D @ other (left) or other @ D for the tangent D (*lead, *x.shape) of operand x. A vector x
    against a batch of matrices: its tangents are taken as one row (column) per direction. A
    matrix with fewer batch axes than the other (a weight shared by a batch of matrices, moved
    in forward mode) gets ones between its direction axes and its own, so that broadcasting
    pairs its axes with the other's, not with the directions."""
    lead = D.ndim - x.ndim
    if x.ndim == 1 and other.ndim == 1:
        return D @ other
    if x.ndim == 1:
        rows = D.reshape(-1, x.shape[0])
        R = np.moveaxis(rows @ other, -2, 0) if left else np.moveaxis(other @ rows.T, -1, 0)
        return R.reshape(D.shape[:lead] + R.shape[1:])
    if lead and 2 <= x.ndim < other.ndim:
        D = D.reshape(D.shape[:lead] + (1,) * (other.ndim - x.ndim) + x.shape)
    return _mm(D, other, a_tan=True) if left else _mm(other, D, b_tan=True)


def _mm(A, B, a_tan=False, b_tan=False):
    """matmul where one operand is a tangent with leading axes; 1-D primal operands promoted."""
    if b_tan and A.ndim == 1:
        return np.squeeze(A[None, :] @ B, axis=-2)
    if a_tan and B.ndim == 1:
        return (A @ B[:, None])[..., 0]
    return mm(A, B)


# ---- Einsum --------------------------------------------------------------------------------------


def _parse_einsum(equation, operands):
    """Input subscripts (list) and output subscripts of an equation, made explicit."""
    eq = equation.replace(" ", "")
    if "->" in eq:
        lhs, out = eq.split("->")
    else:
        lhs = eq
        letters = [c for c in lhs.replace("...", "") if c.isalpha()]
        out = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    subs = lhs.split(",")
    if len(subs) != len(operands):
        raise ValueError(f"equation {equation!r} names {len(subs)} operands, the node has {len(operands)}")
    return subs, out


def _fresh(equation, k=1):
    used = set(equation)
    free = [c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba" if c not in used]
    return free[:k]


@rule("Einsum", since=12)
class Einsum:
    """Output = the Einstein summation `equation` of the inputs."""

    keeps = True

    def forward(*Inputs, equation):
        if any(x.dtype.kind == "V" for x in Inputs):  # bfloat16 (ml_dtypes'), which einsum has no loops for
            narrow = Inputs[0].dtype
            return Einsum.forward(*(x.astype(np.float32) for x in Inputs), equation=equation).astype(narrow)
        return np.einsum(equation, *Inputs, optimize=len(Inputs) > 2)

    def jvp(cx, *Xdots, equation):
        subs, out = _parse_einsum(equation, cx.x)
        (t,) = _fresh(equation)
        terms = []
        for i, D in enumerate(Xdots):
            if D is None:
                continue
            flat, head = lead_flat(D, cx.x[i].ndim)
            s = list(subs)
            s[i] = t + s[i]
            ops = list(cx.x)
            ops[i] = flat
            R = np.einsum(",".join(s) + "->" + t + out, *ops, optimize=True)
            terms.append(R.reshape(head + R.shape[1:]))
        return add(*terms)

    def vjp(cx, Ybar, *, equation):
        subs, out = _parse_einsum(equation, cx.x)
        t = _fresh(equation)[0]
        flat, head = lead_flat(Ybar, cx.y[0].ndim)
        bars = []
        for i, X in enumerate(cx.x):
            bars.append(_einsum_cotangent(cx, i, X, subs, out, t, flat, head) if cx.need[i] else None)
        return tuple(bars)


def _einsum_cotangent(cx, i, X, subs, out, t, flat, head):
    """d/dX_i of <Ybar, einsum(...)>: Ybar summed against the other operands, in X_i's layout.
    An index repeated in X_i's subscripts (a trace, 'nii') reads its diagonal: the cotangent of
    that diagonal, written on X_i's diagonal, zeros elsewhere."""
    target = subs[i]
    before, dots, after = target.partition("...")
    letters = before + after
    if len(set(letters)) != len(letters):
        once = "".join(c for k, c in enumerate(target) if c == "." or c not in target[:k])
        diagonal = np.einsum(f"{target}->{once}", X)
        D = _einsum_cotangent(cx, i, diagonal, subs[:i] + [once] + subs[i + 1:], out, t, flat, head)
        lead = "".join(_fresh("".join(subs) + out + t, D.ndim - diagonal.ndim))
        bar = np.zeros(D.shape[:D.ndim - diagonal.ndim] + X.shape, D.dtype)
        np.einsum(f"{lead}{target}->{lead}{once}", bar)[...] = D  # a view of bar's diagonal
        return bar
    sample = ""
    if cx.keep[i]:
        if not out or not out[0].isalpha():
            raise UnsupportedOpError("Einsum: per-sample cotangents need the output's first axis to be a named index")
        sample = out[0]
    others = [s for j, s in enumerate(subs) if j != i]
    avail = set(out + "".join(others))
    kept = "".join(c for c in letters if c in avail)
    R = np.einsum(",".join([t + out] + others) + "->" + t + sample + dots + kept,
                  flat, *(x for j, x in enumerate(cx.x) if j != i), optimize=True)
    pre = 1 + len(sample)
    n_dots = X.ndim - len(letters)
    ell = X.shape[len(before): len(before) + n_dots]
    size = dict(zip(before, X.shape)) | dict(zip(after, X.shape[len(before) + n_dots:]))
    R = unbroadcast(R, ell + tuple(size[c] for c in kept), pre)  # sums ellipsis dims X broadcast
    # R: (L, [N], *ellipsis, *kept) -> X's layout, with size 1 for letters only X carries
    axis = {c: pre + n_dots + k for k, c in enumerate(kept)}
    order = [axis[c] for c in before if c in axis] + list(range(pre, pre + n_dots)) + [axis[c] for c in after if c in axis]
    R = R.transpose(list(range(pre)) + order)
    shape = R.shape[:pre] + tuple(
        [X.shape[k] if c in axis else 1 for k, c in enumerate(before)] + list(ell)
        + [X.shape[len(before) + n_dots + k] if c in axis else 1 for k, c in enumerate(after)]
    )
    R = np.broadcast_to(R.reshape(shape), R.shape[:pre] + X.shape)
    return R.reshape(head + R.shape[1:])


# ---- determinant and inverse of square matrices in the last two axes ----------------------------


def _inv_t(A):
    """A^-T, or a one-line refusal for a singular matrix, whose inverse (and so the derivative of
    its determinant through it) does not exist."""
    try:
        return np.swapaxes(np.linalg.inv(A), -1, -2)
    except np.linalg.LinAlgError:
        raise ValueError("a matrix is singular") from None


@rule("Det", since=11)
class Det:
    """Y = det(X) over the last two axes (torch.linalg.det): dY = Y tr(X^-1 dX)."""

    def forward(X):
        return np.linalg.det(X).astype(X.dtype)

    def jvp(cx, Xdot):
        return cx.y[0] * (_inv_t(cx.x[0]) * Xdot).sum(axis=(-2, -1))

    def vjp(cx, Ybar):
        return ((Ybar * cx.y[0])[..., None, None] * _inv_t(cx.x[0]),)


@rule("Inverse", since=1, domain="com.microsoft")
class Inverse:
    """Y = X^-1 over the last two axes (torch.inverse, an onnxruntime operator): dY = -Y dX Y."""

    def forward(X):
        return np.linalg.inv(X)

    def jvp(cx, Xdot):
        Y = cx.y[0]
        return -(Y @ Xdot @ Y)

    def vjp(cx, Ybar):
        Yt = np.swapaxes(cx.y[0], -1, -2)
        return (-(Yt @ Ybar @ Yt),)
