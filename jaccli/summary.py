"""Per-sample statistics of a Jacobian, accumulated chunk by chunk, aggregated over samples."""

from __future__ import annotations

import numpy as np

SVD_LIMIT = 4096  # the smaller side above which singular values are skipped


class Summary:
    """Norms, singular values, zeros, and who dominates, from chunks of J (n, n_rows, n_cols)."""

    def __init__(self, result):
        self.result = result
        n = result.flat_shape[0]
        # per-sample statistics in float64 arrays (a million samples: 32 MB, not Python floats)
        self.sq, self.smax, self.smin, self.cond = np.zeros(n), np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        self.done = 0
        self.svd = True
        self.svd_note = f"singular values skipped: each per-sample matrix is larger than {SVD_LIMIT} on both sides"
        self.zeros = 0
        self.total = 0
        self.col_abs = None
        self.finite = True

    def update(self, block, rows=None, piece_bytes=16 << 20):
        """Add a block of samples (n, rows, columns), in pieces of bounded size (float64 copies).
        `rows` (r0, r1): the block holds those rows of one sample only, when a sample's rows
        were too many for the memory budget; its singular values are then not computed."""
        n_rows = self.result.flat_shape[1]
        whole = rows is None or tuple(rows) == (0, n_rows)
        if not whole and self.svd:
            self.svd = False
            self.svd_note = "singular values skipped: one sample's Jacobian was over the memory budget, so computed in parts"
        last = rows is None or rows[1] == n_rows
        step = max(1, piece_bytes // max(1, 8 * int(np.prod(block.shape[1:]))))
        for a in range(0, block.shape[0], step):
            self._update(block[a: a + step], last)

    def _update(self, Jc, last):
        Jc = np.asarray(Jc, dtype=np.float64)
        n, r, c = Jc.shape
        self.zeros += int(np.count_nonzero(Jc == 0))
        self.total += Jc.size
        if not np.isfinite(Jc).all():
            self.finite = False
            Jc = np.nan_to_num(Jc)
        at = slice(self.done, self.done + n)
        self.sq[at] += (Jc * Jc).sum(axis=(1, 2))
        if self.svd and min(r, c) <= SVD_LIMIT:
            G = Jc @ Jc.transpose(0, 2, 1) if r <= c else Jc.transpose(0, 2, 1) @ Jc  # Gram of the smaller side
            s = np.sqrt(np.clip(np.linalg.eigvalsh(G), 0, None))
            self.smax[at], self.smin[at] = s[:, -1], s[:, 0]
            with np.errstate(divide="ignore", invalid="ignore"):
                self.cond[at] = np.where(s[:, 0] > 0, s[:, -1] / s[:, 0], np.inf)
        else:
            self.svd = False
        a = np.abs(Jc).sum(axis=(0, 1)) if self.result.kind == "input" else (Jc * Jc).sum(axis=(0, 1))
        self.col_abs = a if self.col_abs is None else self.col_abs + a
        if last:
            self.done += n

    def finish(self, top=5):
        """A plain dict (JSON-ready) of the statistics."""
        r = self.result
        N, rows, cols = r.flat_shape
        d = {
            "kind": r.kind,
            "output": r.of,
            "output_shape": list(r.out_shape),
            "wrt": r.wrt if r.kind == "input" else f"{len(r.columns)} parameter tensors",
            "jacobian_shape": list(r.shape),
            "samples": N,
            "rows_per_sample": rows,
            "columns_per_sample": cols,
            "mode": r.mode,
            "dtype": str(np.dtype(r.dtype)),
            "seconds": round(r.seconds, 4),
            "chunk_samples": r.chunks[0],
            "chunk_directions": r.chunks[1],
            "zero_share": self.zeros / max(1, self.total),
            "finite": self.finite,
            "notes": list(r.notes),
        }
        stats = [("frobenius_norm", np.sqrt(self.sq))]
        if self.svd:
            stats += [("spectral_norm", self.smax), ("smallest_singular_value", self.smin), ("condition_number", self.cond)]
        d["stats"] = {name: _agg(vals[: self.done]) for name, vals in stats if self.done}
        if not self.svd:
            d["notes"].append(self.svd_note)
        if r.kind == "input":
            share = self.col_abs / max(self.col_abs.sum(), 1e-300)
            idx = np.argsort(-self.col_abs)[:top]
            d["top_inputs"] = [
                {"index": [int(i) for i in np.unravel_index(k, r.in_shape)] if r.in_shape else [],
                 "mean_abs": float(self.col_abs[k] / (N * rows)), "share": float(share[k]),
                 **({"label": r.labels[int(k)]} if int(k) in r.labels else {})}
                for k in idx
            ]
        else:
            total = max(self.col_abs.sum(), 1e-300)
            d["parameters"] = [
                {**{k: v for k, v in c.items() if k != "offset"},
                 "grad_norm_share": float(self.col_abs[c["offset"] : c["offset"] + c["size"]].sum() / total)}
                for c in r.columns
            ]
        return d


def _agg(v):
    fin = v[np.isfinite(v)]
    if fin.size == 0:
        return {"mean": float("inf"), "min": float("inf"), "median": float("inf"), "max": float("inf")}
    return {"mean": float(fin.mean()), "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
