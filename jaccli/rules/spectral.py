"""Fourier transforms: DFT and STFT (torch.stft and torch.fft exported at opset 17 and on).

ONNX keeps a complex value as a last axis of two, its real and imaginary parts; a real one has
a last axis of one. Both transforms are linear in the signal, so a tangent goes through the
transform itself. A cotangent goes through its adjoint for the real inner product, which for a
complex matrix F is F^H: the DFT's adjoint is an unnormalised inverse DFT, computed by numpy's
FFT, never as a matrix.
"""

from __future__ import annotations

import numpy as np

from . import rule
from ..errors import ModelError
from ._util import padded, unbroadcast


def _complex(X):
    """(..., 1 or 2) real parts and imaginary parts -> complex (...), or real (...) for a last axis of one."""
    return X[..., 0] if X.shape[-1] == 1 else X[..., 0] + 1j * X[..., 1]


def _parts(Z, real):
    """Complex (...) -> (..., 2); with `real`, the real part alone, (..., 1)."""
    return Z.real[..., None] if real else np.stack([Z.real, Z.imag], axis=-1)


def _fit(Z, n, axis):
    """Z cut or zero-padded to length n along axis, as a DFT does to its signal."""
    m = Z.shape[axis]
    if m >= n:
        return Z[(slice(None),) * (axis % Z.ndim) + (slice(0, n),)]
    width = [(0, 0)] * Z.ndim
    width[axis] = (0, n - m)
    return np.pad(Z, width)


def _length(n, dft_length, inverse, onesided):
    """The DFT size: dft_length, else the signal's length (2 (n - 1) for a one-sided inverse)."""
    if dft_length is not None:
        return int(dft_length)
    return 2 * (n - 1) if inverse and onesided else n


def _dft(Z, L, axis, inverse, onesided):
    """The ONNX DFT of complex (or real) Z along axis (negative), size L."""
    if not onesided:
        return np.fft.ifft(Z, n=L, axis=axis) if inverse else np.fft.fft(Z, n=L, axis=axis)
    if inverse:
        if Z.shape[axis] != L // 2 + 1:  # onnxruntime and onnx's reference fill the others in their own way
            raise ValueError(f"a one-sided inverse DFT of size {L} takes {L // 2 + 1} bins, not {Z.shape[axis]}")
        return np.fft.irfft(Z, n=L, axis=axis)
    if np.iscomplexobj(Z):
        raise ValueError("a one-sided forward DFT takes a real signal")
    return np.fft.rfft(Z, n=L, axis=axis)


def _dft_adjoint(G, n, L, axis, inverse, onesided):
    """The adjoint of _dft for the real inner product, from its output's cotangent G (complex, or
    real for a one-sided inverse) to the signal's, of length n along axis (complex)."""
    if not onesided:  # F^H = L * ifft; the inverse's adjoint is F / L
        W = np.fft.fft(G, axis=axis) / L if inverse else np.fft.ifft(G, axis=axis) * L
    elif not inverse:  # rfft keeps the first L // 2 + 1 bins of F: the others' cotangents are zero
        W = np.fft.ifft(_fit(G, L, axis), axis=axis) * L
    else:  # irfft: bin k enters twice (k and L - k), except DC and, for an even L, Nyquist
        W = np.fft.rfft(G, n=L, axis=axis) / L
        twice = np.full(W.shape[axis], 2.0)
        twice[0] = 1
        if L % 2 == 0:
            twice[-1] = 1
        W = W * twice.reshape((-1,) + (1,) * (-axis - 1)).astype(W.real.dtype)
    return _fit(W, n, axis)


class _DFT:
    """Y = the DFT of `input` along `axis`, with its size, direction and sidedness."""

    @staticmethod
    def apply(X, dft_length, axis, inverse, onesided):
        a = _neg(axis, X) + 1  # on the complex values, without the last axis
        if X.shape[-1] not in (1, 2) or a >= 0:
            raise ValueError(f"a DFT's input ends in an axis of 1 (real) or 2 (complex) parts, not {X.shape[-1]}, "
                             "and is transformed along another")
        Z = _complex(X)
        L = _length(Z.shape[a], dft_length, inverse, onesided)
        return _parts(_dft(Z, L, a, inverse, onesided), real=bool(inverse and onesided))

    @staticmethod
    def adjoint(cx, Ybar, dft_length, axis, inverse, onesided):
        X = cx.x[0]
        a = _neg(axis, X) + 1
        n = X.shape[a - 1]
        L = _length(n, dft_length, inverse, onesided)
        G = Ybar[..., 0] if inverse and onesided else _complex(Ybar)
        W = _dft_adjoint(G, n, L, a, inverse, onesided)
        return _parts(W, real=X.shape[-1] == 1).astype(Ybar.dtype, copy=False)


@rule("DFT", since=17)
class DFT17(_DFT):
    """DFT of opsets 17 to 19: the axis is an attribute (default 1, the first after the batch)."""

    nondiff = (1,)

    def forward(input, dft_length=None, *, axis=1, inverse=0, onesided=0):
        return _DFT.apply(input, dft_length, axis, inverse, onesided)

    def jvp(cx, Xdot, _=None, *, axis=1, inverse=0, onesided=0):
        return _DFT.apply(Xdot, padded(cx.x, 2)[1], _neg(axis, cx.x[0]), inverse, onesided)

    def vjp(cx, Ybar, *, axis=1, inverse=0, onesided=0):
        return (_DFT.adjoint(cx, Ybar, padded(cx.x, 2)[1], _neg(axis, cx.x[0]), inverse, onesided), None)


@rule("DFT", since=20)
class DFT(_DFT):
    """DFT from opset 20: the axis is an input (default -2, the last signal axis)."""

    nondiff = (1, 2)

    def forward(input, dft_length=None, axis=None, *, inverse=0, onesided=0):
        return _DFT.apply(input, dft_length, _axis(axis, input), inverse, onesided)

    def jvp(cx, Xdot, *_, inverse=0, onesided=0):
        X, length, axis = padded(cx.x, 3)
        return _DFT.apply(Xdot, length, _axis(axis, X), inverse, onesided)

    def vjp(cx, Ybar, *, inverse=0, onesided=0):
        X, length, axis = padded(cx.x, 3)
        return (_DFT.adjoint(cx, Ybar, length, _axis(axis, X), inverse, onesided), None, None)


def _axis(axis, X):
    return _neg(-2 if axis is None else int(axis), X)


def _neg(axis, X):
    """An axis of X counted from its end, so that it holds with leading direction axes too."""
    return axis if axis < 0 else axis - X.ndim


@rule("STFT", since=17)
class STFT:
    """Y (N, frames, bins, 2) = the DFT of each frame of the signal (N, T, 1 or 2; or (N, T), real,
    as torch's exporter writes it), frames of frame_length every frame_step, times the window
    (a parameter if it is one)."""

    nondiff = (1, 3)
    keeps = True  # the window's per-sample cotangent

    def forward(signal, frame_step, window=None, frame_length=None, *, onesided=1):
        Z, w, fl = STFT.frames(signal, signal.ndim, frame_step, window, frame_length)
        return _parts(_dft(Z * w, fl, -1, 0, onesided), real=False)

    def frames(X, rank, frame_step, window, frame_length):
        """The frames (..., N, frames, fl) of X, a signal of `rank` (complex or real) with leading
        axes, the window (1 if none) and the frame length."""
        Z = X if rank == 2 else _complex(X)
        T = Z.shape[-1]
        fl = int(frame_length) if frame_length is not None else window.shape[0] if window is not None else T
        step = int(frame_step)
        if fl > T or step < 1:
            raise ValueError(f"frames of {fl} every {step} do not fit a signal of {T}")
        Z = np.lib.stride_tricks.sliding_window_view(Z, fl, axis=-1)[..., ::step, :]
        return Z, (1 if window is None else window), fl

    def jvp(cx, Xdot, _=None, Wdot=None, __=None, *, onesided=1):
        X, step, W, fl = padded(cx.x, 4)
        U = None
        if Xdot is not None:
            Z, w, n = STFT.frames(Xdot, X.ndim, step, W, fl)
            U = Z * w
        if Wdot is not None:  # (*lead, fl): over every sample and frame
            Z, _, n = STFT.frames(X, X.ndim, step, W, fl)
            t = Z * Wdot.reshape(Wdot.shape[:-1] + (1, 1, n))
            U = t if U is None else U + t
        return _parts(_dft(U, n, -1, 0, onesided), real=False)

    def vjp(cx, Ybar, *, onesided=1):
        X, step, W, fl = padded(cx.x, 4)
        Z, w, n = STFT.frames(X, X.ndim, step, W, fl)
        U = _dft_adjoint(_complex(Ybar), n, n, -1, 0, onesided)  # (*lead, N, frames, fl): the windowed frames'
        Xbar = Wbar = None
        if cx.need[0]:
            S = _overlap_add(U * w, X.shape[-1] if X.ndim == 2 else X.shape[-2], int(step))
            Xbar = (S.real if X.ndim == 2 else _parts(S, real=X.shape[-1] == 1)).astype(Ybar.dtype, copy=False)
        if len(cx.need) > 2 and cx.need[2]:
            G = (U * np.conj(Z)).real.astype(Ybar.dtype, copy=False)
            Wbar = unbroadcast(G, W.shape, cx.lead(Ybar), cx.keep[2])
        return Xbar, None, Wbar, None


def _overlap_add(F, T, step):
    """Frames F (..., frames, fl) added back into a signal (..., T): the adjoint of framing. One
    frame or one offset at a time, whichever are fewer."""
    frames, n = F.shape[-2:]
    S = np.zeros(F.shape[:-2] + (T,), F.dtype)
    if frames <= n:
        for i in range(frames):
            S[..., i * step : i * step + n] += F[..., i, :]
    else:
        for k in range(n):
            S[..., k : k + step * (frames - 1) + 1 : step] += F[..., k]
    return S


@rule("MelWeightMatrix", since=17)
class MelWeightMatrix:
    """The (dft_length // 2 + 1, num_mel_bins) matrix of triangular filters that maps a one-sided
    spectrum to mel bins (a spectrogram's front end: STFT, magnitude, this matrix). The bins'
    edges are evenly spaced in mel, 2595 log10(1 + f / 700), from lower_edge_hertz up, and
    floored to DFT bins at (dft_length + 1) f / sample_rate, as the ONNX reference and
    onnxruntime compute them. Every input is a scalar, so it has no derivative."""

    nondiff = (0, 1, 2, 3, 4)

    def forward(num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz, *, output_datatype=1):
        from onnx import helper

        mels, n, rate = (int(np.ravel(v)[0]) for v in (num_mel_bins, dft_length, sample_rate))
        low, high = (float(np.ravel(v)[0]) for v in (lower_edge_hertz, upper_edge_hertz))
        bins = n // 2 + 1
        to_mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
        mel = to_mel(low) + np.arange(mels + 2) * ((to_mel(high) - to_mel(low)) / (mels + 2))
        edges = (((n + 1) * (700 * (10 ** (mel / 2595) - 1))) // rate).astype(np.int64)
        ends = [(n + 1) * f // rate for f in (low, high)] if rate > 0 else [-1]  # the edges' own bins
        if min(ends) < 0 or max(ends) >= bins or edges.min() < 0 or edges.max() >= bins:  # as onnxruntime refuses them
            raise ModelError(f"MelWeightMatrix: {mels} mel filters from {low:g} to {high:g} Hz at a {rate} Hz sample "
                             f"rate do not fit the {bins} bins of a {n}-point DFT")
        W = np.zeros((bins, mels))
        for i, (left, center, right) in enumerate(zip(edges, edges[1:], edges[2:])):
            if center == left:
                W[center, i] = 1
            else:
                W[left:center + 1, i] = (np.arange(left, center + 1) - left) / (center - left)
            if right > center:
                W[center:right, i] = (right - np.arange(center, right)) / (right - center)
        return W.astype(helper.tensor_dtype_to_np_dtype(output_datatype))
