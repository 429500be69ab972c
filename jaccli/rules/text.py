"""Text operators: StringNormalizer, Tokenizer (com.microsoft) and TfIdfVectorizer, the front of a
scikit-learn text pipeline (TfidfVectorizer, CountVectorizer) as skl2onnx writes it; and
StringConcat, StringSplit and RegexFullMatch.

They turn strings (or token ids) into counts: no derivative flows through them, so they only run
forward, as onnxruntime runs them, for the parameter Jacobian of the classifier behind them and
the input Jacobian with respect to the features they produce (`--wrt`).
"""

from __future__ import annotations

import re

import numpy as np

from . import rule
from .ml import _texts

MS = "com.microsoft"


def _strings(X):
    """X as an object array of Python strings, of X's shape (bytes read as UTF-8)."""
    return _texts(X).reshape(np.shape(X))


def _padded(rows, width, pad):
    """Ragged rows as an object array (len(rows), width), filled out with `pad`."""
    out = np.full((len(rows), width), pad, object)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _case(s, action):
    """One character at a time, by Unicode's simple case mappings, as onnxruntime's tolower and
    toupper in a UTF-8 locale: where Python's (full) mapping of a character is longer, its simple
    one is the first of the lower-case letters (capital I with a dot: i), the title case of a
    Greek letter with iota subscript, and otherwise none (German sharp s stays)."""
    if action == "NONE":
        return s
    return "".join(map(_lower if action == "LOWER" else _upper, s))


def _lower(c):
    m = c.lower()
    return m if len(m) == 1 else m[0]


def _upper(c):
    m = c.upper()
    if len(m) == 1:
        return m
    t = c.title()
    return t if len(t) == 1 else c


@rule("StringNormalizer", since=10)
class StringNormalizer:
    """Y = the strings of X ([C] or [1, C]) less the stopwords, case changed: LOWER, UPPER or NONE.
    Without is_case_sensitive the stopwords match in the case the output takes (lower unless
    UPPER). With none left, one empty string ([1] or [1, 1])."""

    nondiff = (0,)

    def forward(X, *, case_change_action="NONE", is_case_sensitive=0, locale=None, stopwords=None):
        if case_change_action not in ("LOWER", "UPPER", "NONE"):
            raise ValueError(f"StringNormalizer: case_change_action '{case_change_action}' is none of LOWER, UPPER, NONE")
        X = _strings(X)
        if X.ndim not in (1, 2) or X.ndim == 2 and X.shape[0] != 1:
            raise ValueError(f"StringNormalizer takes strings of shape [C] or [1, C], not {list(X.shape)}")
        row = X.ravel().tolist()
        if stopwords:
            if is_case_sensitive:
                stop = set(stopwords)
                row = [s for s in row if s not in stop]
            else:
                compare = "UPPER" if case_change_action == "UPPER" else "LOWER"
                stop = {_case(w, compare) for w in stopwords}
                cased = [_case(s, compare) for s in row]
                row = [c if case_change_action != "NONE" else s for s, c in zip(row, cased) if c not in stop]
                case_change_action = "NONE"  # already in the output's case
        row = [_case(s, case_change_action) for s in row] or [""]
        return _texts(row).reshape((1, -1) if X.ndim == 2 else (-1,))


class _Regex:
    """A regular expression of onnxruntime's (RE2, longest match) run with Python's re. RE2's
    classes (\\w, \\d, \\s, \\b) are ASCII, so the pattern is compiled ASCII. RE2 takes the longest
    of the matches that start leftmost, Python's the first alternative that matches: where the
    pattern has alternatives or optional parts, the longest is searched for. A pattern with
    Python's own flag (?u) is scikit-learn's token pattern, which skl2onnx passes on as it is and
    onnxruntime's RE2 rejects: it runs as scikit-learn runs it, its classes Unicode."""

    def __init__(self, pattern, what, op="Tokenizer"):
        try:
            self.rx = re.compile(_posix_classes(pattern), 0 if "(?u)" in pattern else re.ASCII)
        except re.error as e:
            raise ValueError(f"{op}: {what} '{pattern}' is no regular expression jaccli can run ({e})") from None
        self.ambiguous = "|" in pattern or "?" in pattern

    def search(self, text, pos):
        """(start, end) of the leftmost-longest match in text from pos, or None."""
        m = self.rx.search(text, pos)
        if m is None:
            return None
        s, e = m.span()
        if self.ambiguous:
            e = next((k for k in range(len(text), e, -1) if self.rx.fullmatch(text, s, k)), e)
        return s, e


_POSIX = {"alnum": "a-zA-Z0-9", "alpha": "a-zA-Z", "ascii": "\\x00-\\x7f", "blank": " \\t", "cntrl": "\\x00-\\x1f\\x7f",
          "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~", "punct": "!-/:-@\\[-`{-~",
          "space": " \\t\\n\\r\\f\\v", "upper": "A-Z", "word": "0-9A-Za-z_", "xdigit": "0-9A-Fa-f"}


def _posix_classes(pattern):
    """RE2's POSIX classes inside brackets ([[:alpha:]]), which Python's re would read as a set of
    characters, spelled as the ranges they stand for."""
    out, i, inside = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        m = re.match(r"\[:(\^?)([a-z]+):\]", pattern[i:]) if inside else None
        if m:
            if m.group(1) or m.group(2) not in _POSIX:
                raise ValueError(f"the class [:{m.group(1)}{m.group(2)}:] of '{pattern}' is not one jaccli can run")
            out.append(_POSIX[m.group(2)])
            i += m.end()
            continue
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
            out.append(pattern[i:i + 2] if pattern[i + 1:i + 2] in ("]", "^") else c)  # a leading ] or ^ is the set's own
            i += len(out[-1])
            continue
        if c == "]" and inside:
            inside = False
        out.append(c)
        i += 1
    return "".join(out)


def _split(text, sep, mincharnum):
    """The pieces of text between the matches of sep that have mincharnum characters or more;
    an empty match drops the character it stands before, as in onnxruntime."""
    pieces, pos = [], 0
    while True:
        span = sep.search(text, pos) if pos <= len(text) else None
        if span is None:
            if len(text) - pos >= mincharnum:
                pieces.append(text[pos:])
            return pieces
        s, e = span
        if s - pos >= mincharnum:
            pieces.append(text[pos:s])
        pos = e if e > s else s + 1


def _matches(text, rx, mincharnum):
    """The matches of rx in text that have mincharnum characters or more; past a shorter one the
    search goes on one character after its start."""
    tokens, pos = [], 0
    while pos <= len(text):
        span = rx.search(text, pos)
        if span is None:
            break
        s, e = span
        if e - s >= mincharnum:
            tokens.append(text[s:e])
            pos = e
        else:
            pos = s + 1
    return tokens


@rule("Tokenizer", since=1, domain=MS)
class Tokenizer:
    """Y (*X.shape, T) = each string's tokens, padded with pad_value to the most any string has:
    the matches of tokenexp, or the pieces between the matches of the separators (regular
    expressions, applied one after another), of mincharnum characters or more; each character
    where the one separator is "" or tokenexp is ".". With mark, each row starts with '\\x02' and
    its tokens end with '\\x03' (before the padding). T is 0 where no string has a token."""

    nondiff = (0,)

    def forward(X, *, mark=0, pad_value="", mincharnum=1, separators=None, tokenexp=None):
        X = _strings(X)
        if X.ndim not in (1, 2):
            raise ValueError(f"Tokenizer takes strings of shape [C] or [N, C], not {list(X.shape)}")
        if mincharnum < 1:
            raise ValueError("Tokenizer: mincharnum must be positive")
        chars = separators == [""] if separators else tokenexp == "."
        if not separators and not tokenexp:
            raise ValueError("Tokenizer needs separators or tokenexp")
        if chars:
            rows = [list(s) for s in X.ravel().tolist()]
        elif separators:
            seps = [_Regex(s, "separator") for s in separators]
            rows = []
            for s in X.ravel().tolist():
                row = [s]
                for sep in seps:
                    row = [p for piece in row for p in _split(piece, sep, mincharnum)]
                    if not row:
                        break
                rows.append(row)
        else:
            rx = _Regex(tokenexp, "tokenexp")
            rows = [_matches(s, rx, mincharnum) for s in X.ravel().tolist()]
        T = max((len(r) for r in rows), default=0)
        if T == 0:
            return np.empty(X.shape + (0,), object)
        width = T + 2 * bool(mark)
        rows = [["\x02", *r, "\x03"] for r in rows] if mark else rows
        return _padded(rows, width, pad_value).reshape(X.shape + (width,))


@rule("TfIdfVectorizer", since=9)
class TfIdfVectorizer:
    """Y ([V] or [B, V], float) = per row of X ([C] or [B, C], strings or integers) the counts of the
    pool's n-grams, n from min_gram_length to max_gram_length, in column ngram_indexes[id], V the
    largest of those plus one. An n-gram of n >= 2 takes its items skip + 1 apart, for every
    skip up to max_skip_count (a 1-gram is counted once). mode TF: the counts; IDF: an n-gram's
    weight where it is found at all; TFIDF: its counts times its weight (1 without weights)."""

    nondiff = (0,)

    def forward(X, *, max_gram_length, min_gram_length, max_skip_count, mode, ngram_counts, ngram_indexes,
                pool_int64s=None, pool_strings=None, weights=None):
        if mode not in ("TF", "IDF", "TFIDF"):
            raise ValueError(f"TfIdfVectorizer: mode '{mode}' is none of TF, IDF, TFIDF")
        if not 0 < min_gram_length <= max_gram_length <= len(ngram_counts):
            raise ValueError("TfIdfVectorizer: gram lengths out of the range of ngram_counts")
        find = _pool(pool_int64s, pool_strings, ngram_counts, min_gram_length, max_gram_length)
        columns = np.asarray(ngram_indexes, np.int64)
        V = int(columns.max()) + 1
        if weights is not None and len(weights) and len(weights) != len(columns):
            raise ValueError(f"TfIdfVectorizer: {len(weights)} weights for {len(columns)} n-grams")
        X = np.asarray(X)
        if X.ndim > 2:
            raise ValueError(f"TfIdfVectorizer takes a row [C] or rows [B, C], not {list(X.shape)}")
        rows = X.reshape(X.shape[0] if X.ndim == 2 else 1, X.shape[-1] if X.ndim else 1)
        rows = _strings(rows) if pool_strings else rows.astype(np.int64, copy=False)
        counts = np.zeros((len(rows), len(columns)), np.float32)  # per n-gram of the pool
        for b, row in enumerate(rows.tolist()):
            for gid in _ngrams(row, find, min_gram_length, max_gram_length, max_skip_count):
                counts[b, gid] += 1
        if mode != "TF":
            w = np.ones(len(columns), np.float32) if weights is None or not len(weights) else np.asarray(weights, np.float32)
            counts = (counts > 0) * w if mode == "IDF" else counts * w
        Y = np.zeros((len(rows), V), np.float32)
        np.add.at(Y, (slice(None), columns), counts)
        return Y.reshape((V,) if X.ndim < 2 else (len(rows), V))


def pool_ngrams(pool_int64s, pool_strings, ngram_counts):
    """A TfIdfVectorizer's pool as (id, n-gram) pairs, n-grams as tuples, ids counting every one."""
    items = _strings(pool_strings).tolist() if pool_strings else [int(v) for v in (pool_int64s or [])]
    if not items:
        raise ValueError("TfIdfVectorizer needs pool_strings or pool_int64s")
    gid = 0
    for n, start in enumerate(ngram_counts, start=1):
        end = ngram_counts[n] if n < len(ngram_counts) else len(items)
        if end < start or end > len(items) or (end - start) % n:
            raise ValueError(f"TfIdfVectorizer: ngram_counts do not cut the pool into whole {n}-grams")
        for k in range(start, end, n):
            yield gid, tuple(items[k:k + n])
            gid += 1


def _pool(pool_int64s, pool_strings, ngram_counts, lo, hi):
    """The pool's n-grams of lengths lo..hi as {tuple: id}."""
    return {g: gid for gid, g in pool_ngrams(pool_int64s, pool_strings, ngram_counts) if lo <= len(g) <= hi}


def _ngrams(row, find, lo, hi, max_skip):
    """The ids of the pool's n-grams found in one row, once per occurrence, as onnxruntime counts."""
    C = len(row)
    if lo == 1:
        for item in row:
            gid = find.get((item,))
            if gid is not None:
                yield gid
        lo = 2
    if lo > hi:
        return
    for d in range(1, max_skip + 2):
        for start in range(C):
            if start + d * (lo - 1) >= C:
                break
            gram = tuple(row[start:start + d * (hi - 1) + 1:d])
            for n in range(lo, len(gram) + 1):
                gid = find.get(gram[:n])
                if gid is not None:
                    yield gid


@rule("StringConcat", since=20)
class StringConcat:
    """Z = X + Y, string by string, broadcast."""

    nondiff = (0, 1)

    def forward(X, Y):
        X, Y = np.broadcast_arrays(_strings(X), _strings(Y))
        return _strings(np.frompyfunc(str.__add__, 2, 1)(X, Y))


@rule("StringSplit", since=20)
class StringSplit:
    """Y (*X.shape, M) = each string's pieces between delimiters, padded with "" to the most any
    string has (M), and Z (X.shape, int64) = how many each has. Without a delimiter (or with ""),
    runs of spaces split, and none start or end the pieces; with one, each delimiter splits
    (two in a row: an empty piece between). At most maxsplit splits, the rest in the last piece.
    As onnxruntime: an empty string has no piece, and only the space is whitespace."""

    nondiff = (0,)

    def forward(X, *, delimiter=None, maxsplit=None):
        X = _strings(X)
        cut = -1 if maxsplit is None else maxsplit
        if delimiter:
            pieces = [s.split(delimiter, cut) if s else [] for s in X.ravel().tolist()]
        else:
            most = max(cut, 0)  # re.split's 0: no limit
            pieces = [(re.split(" +", t, most) if cut else [t]) if (t := s.strip(" ")) else [] for s in X.ravel().tolist()]
        M = max((len(p) for p in pieces), default=0)
        Y = _padded(pieces, M, "")
        Z = np.array([len(p) for p in pieces], np.int64)
        return Y.reshape(X.shape + (M,)), Z.reshape(X.shape)


@rule("RegexFullMatch", since=20)
class RegexFullMatch:
    """Y (bool) = whether the pattern (RE2's syntax, run by Python's re; see _Regex) matches the
    whole string."""

    nondiff = (0,)

    def forward(X, *, pattern):
        rx = _Regex(pattern, "pattern", "RegexFullMatch").rx
        X = _strings(X)
        return np.array([rx.fullmatch(s) is not None for s in X.ravel().tolist()], bool).reshape(X.shape)
