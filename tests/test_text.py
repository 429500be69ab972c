"""Text operators, the front of a scikit-learn text pipeline as skl2onnx writes it (StringNormalizer,
com.microsoft's Tokenizer, TfIdfVectorizer): forward against onnxruntime over their attributes,
and a whole pipeline's parameter Jacobian, and its input Jacobian with respect to the n-gram
counts, against differences."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from gradcheck import fd_param_jacobian, rel_err
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.cli import main

DOCS = ["The cat sat on the MAT", "dogs, cats and more dogs", "Straße café déjà vu İstanbul ᾳ ŉ", "", "a b c ab abc abcd",
        "stock prices fell sharply; markets fell"]


LOCALE = "C.UTF-8"  # onnxruntime's StringNormalizer needs its locale installed; every glibc has this one


def _single(op, attrs, x, out_type, domain="", opset=17):
    elem = TensorProto.STRING if np.asarray(x).dtype.kind in "OUS" else helper.np_dtype_to_tensor_dtype(np.asarray(x).dtype)
    node = helper.make_node(op, ["x"], ["y"], domain=domain, **attrs)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", elem, None)],
                          [helper.make_tensor_value_info("y", out_type, None)])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    m = helper.make_model(g, opset_imports=imports)
    m.ir_version = 8
    return m


def _both(m, x):
    """(onnxruntime's output, ours) for the one-node model m on x."""
    from jaccli import walk
    from jaccli.plan import Plan

    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    model = jaccli.load(m)
    got = walk.primal(Plan(model, "y", [], np.float32), {"x": x})["y"]
    return want, got


def _texts(a):
    return np.asarray(a, object)


@pytest.mark.parametrize("case", ["LOWER", "UPPER", "NONE"])
@pytest.mark.parametrize("sensitive", [0, 1])
@pytest.mark.parametrize("stopwords", [None, ["the cat sat on the mat", "A B C AB ABC", "café"]])
@pytest.mark.parametrize("two_d", [False, True])
def test_string_normalizer_as_onnxruntime(case, sensitive, stopwords, two_d):
    attrs = {"case_change_action": case, "is_case_sensitive": sensitive, "locale": LOCALE}
    if stopwords:
        attrs["stopwords"] = stopwords
    x = _texts(DOCS).reshape((1, -1) if two_d else (-1,))
    want, got = _both(_single("StringNormalizer", attrs, x, TensorProto.STRING, opset=10), x)
    assert got.shape == want.shape and got.tolist() == want.tolist()


def test_string_normalizer_with_every_string_a_stopword():
    x = _texts(["Stop", "stop"])
    want, got = _both(_single("StringNormalizer", {"case_change_action": "LOWER", "is_case_sensitive": 0,
                                                   "stopwords": ["STOP"], "locale": LOCALE}, x, TensorProto.STRING), x)
    assert got.tolist() == want.tolist() == [""]


TOKENIZERS = [
    {"tokenexp": "[a-zA-Z0-9_]+"},  # skl2onnx's default token pattern
    {"tokenexp": "\\w\\w+"},  # ASCII word characters, as RE2's
    {"tokenexp": "ab|a|abc"},  # alternatives: RE2 takes the longest match
    {"tokenexp": "c?a(b)?"},  # optional parts
    {"tokenexp": "ab|bcd"},  # past a match too short, the search goes on inside it
    {"tokenexp": "[[:alpha:]]+[[:digit:]]*"},  # RE2's POSIX classes
    {"separators": ["[[:space:][:punct:]]+"]},
    {"tokenexp": "."},  # characters
    {"separators": [" "]},
    {"separators": [" ", ","]},
    {"separators": ["[ ,;]+"]},
    {"separators": [""]},  # characters
    {"separators": ["x*"]},  # an empty match drops the character it stands before
]


@pytest.mark.parametrize("spec", TOKENIZERS, ids=lambda s: repr(s))
@pytest.mark.parametrize("mark", [0, 1])
@pytest.mark.parametrize("mincharnum", [1, 2, 3])
@pytest.mark.parametrize("shape", [(-1,), (2, 3)])
def test_tokenizer_as_onnxruntime(spec, mark, mincharnum, shape):
    chars = spec.get("tokenexp") == "." or spec.get("separators") == [""]
    if chars and mincharnum > 1:
        pytest.skip("onnxruntime refuses mincharnum > 1 for characters")
    attrs = {"mark": mark, "pad_value": "#", "mincharnum": mincharnum, **spec}
    x = _texts(DOCS).reshape(shape)
    want, got = _both(_single("Tokenizer", attrs, x, TensorProto.STRING, domain="com.microsoft"), x)
    assert got.shape == want.shape and got.tolist() == want.tolist()


@pytest.mark.parametrize("spec", [{"tokenexp": "zzz"}, {"separators": ["[a-z ]"]}])
def test_tokenizer_with_no_token_anywhere(spec):
    x = _texts(["abc", "de f"]).reshape(2, 1)
    want, got = _both(_single("Tokenizer", {"mark": 1, "pad_value": "#", "mincharnum": 1, **spec}, x,
                              TensorProto.STRING, domain="com.microsoft"), x)
    assert got.shape == want.shape == (2, 1, 0)


def _tfidf_attrs(strings, mode, lo, hi, skip, permuted, weights):
    """A pool of 1-, 2- and 3-grams over the vocabulary (a, b, c, d) or (1, 2, 3, 4)."""
    vocab = ["a", "b", "c", "d"] if strings else [1, 2, 3, 4]
    grams = [[v] for v in vocab] + [[vocab[i], vocab[j]] for i, j in [(0, 1), (1, 2), (0, 2), (2, 0), (3, 3)]] + \
            [[vocab[0], vocab[1], vocab[2]], [vocab[2], vocab[1], vocab[0]]]
    pool = [v for g in grams for v in g]
    counts = [0, 4, 14]
    idx = list(range(len(grams)))
    if permuted:
        idx = idx[::-1]
    attrs = {"mode": mode, "min_gram_length": lo, "max_gram_length": hi, "max_skip_count": skip,
             "ngram_counts": counts, "ngram_indexes": idx}
    attrs["pool_strings" if strings else "pool_int64s"] = pool
    if weights:
        attrs["weights"] = list(np.linspace(0.5, 2.0, len(grams)))
    return attrs, vocab


@pytest.mark.parametrize("kind", ["strings", "int64", "int32"])
@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
@pytest.mark.parametrize("grams", [(1, 1), (1, 2), (2, 3), (1, 3)])
@pytest.mark.parametrize("skip", [0, 2])
@pytest.mark.parametrize("permuted,weights", [(False, False), (False, True), (True, True)])
def test_tfidf_vectorizer_as_onnxruntime(kind, mode, grams, skip, permuted, weights):
    attrs, vocab = _tfidf_attrs(kind == "strings", mode, *grams, skip, permuted, weights)
    rng = np.random.default_rng(7)
    rows = rng.integers(0, 5, (3, 12))  # 4 stands for a token outside the pool
    if kind == "strings":
        x = _texts([[vocab[k] if k < 4 else "zz" for k in row] for row in rows])
    else:
        x = (rows + 1).astype(np.int64 if kind == "int64" else np.int32)
    for xs in (x, x[0]):  # rows [B, C] and one row [C]
        want, got = _both(_single("TfIdfVectorizer", attrs, xs, TensorProto.FLOAT, opset=9), xs)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert want.any()  # the pool is found in the rows


def test_tfidf_vectorizer_of_no_tokens():
    """A Tokenizer that finds nothing gives rows of no tokens: zero counts, as onnxruntime's."""
    attrs, _ = _tfidf_attrs(True, "TF", 1, 2, 0, False, False)
    x = np.empty((3, 0), object)
    want, got = _both(_single("TfIdfVectorizer", attrs, x, TensorProto.FLOAT, opset=9), x)
    assert got.shape == want.shape == (3, 11) and not got.any()


# ---- a text classifier: skl2onnx's TfidfVectorizer + a dense layer ----------------------------------------------


def text_classifier(rng, classes=3):
    vocab = ["cat", "dog", "dogs", "mat", "stock", "fell", "markets", "the"]
    bigrams = ["the", "cat", "dogs", "and", "prices", "fell"]
    pool = vocab + bigrams
    V = len(vocab) + len(bigrams) // 2
    nodes = [
        helper.make_node("Reshape", ["text", "flat_shape"], ["flat"]),
        helper.make_node("StringNormalizer", ["flat"], ["normalized"], case_change_action="LOWER", is_case_sensitive=0),
        helper.make_node("Tokenizer", ["normalized"], ["tokens"], domain="com.microsoft", mark=0, mincharnum=1,
                         pad_value="#", tokenexp="[a-zA-Z0-9_]+"),
        helper.make_node("TfIdfVectorizer", ["tokens"], ["counts"], mode="TF", min_gram_length=1, max_gram_length=2,
                         max_skip_count=0, ngram_counts=[0, len(vocab)], ngram_indexes=list(range(V)), pool_strings=pool,
                         weights=[1.0] * V),
        helper.make_node("Mul", ["counts", "idf"], ["tfidf"]),
        helper.make_node("MatMul", ["tfidf", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probabilities"], axis=-1),
    ]
    inits = {"flat_shape": np.array([-1], np.int64), "idf": rng.uniform(1, 3, V).astype(np.float32),
             "W": rng.standard_normal((V, classes)).astype(np.float32), "b": rng.standard_normal(classes).astype(np.float32)}
    g = helper.make_graph(nodes, "text", [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 1])],
                          [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m, inits


def test_text_classifier_parameter_jacobian():
    rng = np.random.default_rng(11)
    m, inits = text_classifier(rng)
    x = _texts(DOCS).reshape(-1, 1)
    G, columns = jaccli.param_jacobian(m, x, dtype="float64")
    assert [c["name"] for c in columns] == ["idf", "W", "b"]
    fd = fd_param_jacobian(m, {"text": x}, ["idf", "W", "b"], inits, n=len(DOCS))
    assert G.shape == (len(DOCS), 3, fd.shape[-1]) and rel_err(G, fd) < 1e-7
    V = inits["idf"].size
    assert not G[3, :, :V + V * 3].any() and G[3, :, V + V * 3:].any()  # the empty document counts nothing: only b has a say


def test_text_classifier_through_the_cli(tmp_path):
    """params and check --params run; input needs --wrt, and the hint names the counts; with it,
    the Jacobian with respect to the n-gram counts passes check."""
    import onnx

    m, inits = text_classifier(np.random.default_rng(12))
    onnx.save(m, tmp_path / "text.onnx")
    np.save(tmp_path / "docs.npy", np.array(DOCS).reshape(-1, 1))
    model, data = str(tmp_path / "text.onnx"), str(tmp_path / "docs.npy")
    r = CliRunner().invoke(main, ["params", model, data, "-o", str(tmp_path / "G.npy"), "-q"])
    assert r.exit_code == 0, r.output
    V = inits["idf"].size
    assert np.load(tmp_path / "G.npy").shape == (len(DOCS), 3, V + V * 3 + 3)
    r = CliRunner().invoke(main, ["check", model, data, "--params"])
    assert r.exit_code == 0, r.output
    assert "against onnxruntime's central differences" in " ".join(r.output.split())  # an independent oracle
    (tmp_path / "docs.csv").write_text("text\nthe cat sat\ndogs and cats\n")  # CSV is numbers: the error says where text goes
    r = CliRunner().invoke(main, ["params", model, str(tmp_path / "docs.csv"), "-o", str(tmp_path / "G2.npy")])
    assert r.exit_code != 0 and "np.asarray(texts, dtype=str)" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, ["input", model, data, "-o", str(tmp_path / "J.npy")])
    assert r.exit_code != 0 and "the n-gram counts 'counts'" in r.output
    r = CliRunner().invoke(main, ["input", model, data, "--wrt", "counts", "-o", str(tmp_path / "J.npy")])
    assert r.exit_code == 0, r.output
    assert re.search(r"counts\[\d+\] “[a-z]+( [a-z]+)?”", r.output)  # the summary names the n-grams
    J = np.load(tmp_path / "J.npy")
    W, idf = inits["W"].astype(np.float64), inits["idf"].astype(np.float64)
    from jaccli.oracle import c_locale  # skl2onnx names no locale: onnxruntime's default, en_US.UTF-8, may be missing

    session = ort.InferenceSession(c_locale(m).SerializeToString(), providers=["CPUExecutionProvider"])
    probs = session.run(None, {"text": _texts(DOCS).reshape(-1, 1)})[0]
    # softmax's Jacobian times W^T scaled by idf, per document
    want = np.stack([(np.diag(q) - np.outer(q, q)) @ (W.T * idf) for q in probs.astype(np.float64)])
    assert rel_err(J, want) < 1e-5
    r = CliRunner().invoke(main, ["check", model, data, "--wrt", "counts"])
    assert r.exit_code == 0, r.output


# ---- StringConcat, StringSplit, RegexFullMatch (opset 20) ---------------------------------------------------------


def _run_both(node, feeds, outputs):
    """(onnxruntime's outputs, ours) for a one-node opset-20 model of string inputs."""
    from jaccli import walk
    from jaccli.plan import Plan

    g = helper.make_graph([node], "t", [helper.make_tensor_value_info(k, TensorProto.STRING, None) for k in feeds],
                          [helper.make_tensor_value_info(o, t, None) for o, t in outputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 9
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    env = walk.primal(Plan(jaccli.load(m), outputs[0][0], [], np.float32), feeds)
    return want, [env[o] for o, _ in outputs]


def test_string_concat_as_onnxruntime():
    x, y = _texts(DOCS).reshape(2, 3), _texts(["-a", "", "ß"])
    (want,), (got,) = _run_both(helper.make_node("StringConcat", ["x", "y"], ["z"]), {"x": x, "y": y},
                                [("z", TensorProto.STRING)])
    assert got.shape == want.shape and got.tolist() == want.tolist()


@pytest.mark.parametrize("delimiter", [None, " ", ",", "--"])
@pytest.mark.parametrize("maxsplit", [None, 0, 1, 2])
def test_string_split_as_onnxruntime(delimiter, maxsplit):
    x = _texts(["  a b  c ", "x,,y,z", "one--two----three", "", "solo", "   ", "tab\there"]).reshape(7, 1)
    attrs = {k: v for k, v in (("delimiter", delimiter), ("maxsplit", maxsplit)) if v is not None}
    want, got = _run_both(helper.make_node("StringSplit", ["x"], ["y", "n"], **attrs), {"x": x},
                          [("y", TensorProto.STRING), ("n", TensorProto.INT64)])
    assert got[0].shape == want[0].shape and got[0].tolist() == want[0].tolist()
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("pattern", ["[a-z]+@[a-z]+\\.com", "ab|a", "(\\w+ )*\\w+", "a?", ".*"])
def test_regex_full_match_as_onnxruntime(pattern):
    x = _texts(["me@home.com", "ab", "a", "", "two words", "émigré", "x@y.org"])
    (want,), (got,) = _run_both(helper.make_node("RegexFullMatch", ["x"], ["y"], pattern=pattern), {"x": x},
                                [("y", TensorProto.BOOL)])
    np.testing.assert_array_equal(got, want)


def test_tokenizer_with_scikit_learns_unicode_flag():
    """skl2onnx passes a custom token_pattern on as it is: (?u) is Python's flag, which RE2 (and so
    onnxruntime) rejects; jaccli runs it as scikit-learn does, with Unicode word characters."""
    from jaccli import walk
    from jaccli.plan import Plan

    pattern = "(?u)\\b\\w+\\b"
    x = _texts(DOCS)
    m = _single("Tokenizer", {"mark": 0, "pad_value": "#", "mincharnum": 1, "tokenexp": pattern}, x, TensorProto.STRING,
                domain="com.microsoft")
    got = walk.primal(Plan(jaccli.load(m), "y", [], np.float32), {"x": x})["y"]
    want = [re.findall(pattern, d) for d in DOCS]
    assert got.shape == (len(DOCS), max(map(len, want)))
    assert [[t for t in row if t != "#"] for row in got.tolist()] == want
    assert "déjà" in want[2] and "İstanbul" in want[2]


@pytest.mark.parametrize("permuted", [False, True])
def test_the_counts_columns_are_labelled_with_their_n_grams(permuted):
    """Each column's label is the n-gram the column counts: a row of just that n-gram counts it there."""
    from jaccli.drivers import _element_labels

    attrs, _ = _tfidf_attrs(True, "TF", 1, 3, 0, permuted, False)
    m = _single("TfIdfVectorizer", attrs, _texts([["a"]]), TensorProto.FLOAT, opset=9)
    labels = _element_labels(jaccli.load(m), "y", (11,))
    assert len(labels) == 11
    for col, gram in labels.items():
        _, got = _both(m, _texts([gram.split()]))
        assert got[0, col] >= 1, (col, gram)


def test_text_logistic_regression_through_the_cli(tmp_path):
    """skl2onnx's TfidfVectorizer + LogisticRegression: its coefficients, attributes of a
    LinearClassifier, are parameters beside the IDF weights; check --params perturbs them in the
    attributes, with onnxruntime (its StringNormalizer in C.UTF-8 where en_US.UTF-8 is missing)."""
    import onnx

    m, inits = text_classifier(np.random.default_rng(13))
    g = m.graph
    V = inits["idf"].size
    keep = [n for n in g.node if n.op_type not in ("MatMul", "Add", "Softmax")]
    clf = helper.make_node("LinearClassifier", ["tfidf"], ["label", "probabilities"], domain="ai.onnx.ml",
                           name="LinearClassifier", coefficients=list(np.random.default_rng(1).standard_normal(3 * V)),
                           intercepts=[0.1, -0.2, 0.3], classlabels_ints=[0, 1, 2], post_transform="LOGISTIC")
    del g.node[:]
    g.node.extend(keep + [clf])
    for name in ("W", "b"):
        g.initializer.remove(next(t for t in g.initializer if t.name == name))
    g.output.insert(0, helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 1))
    onnx.save(m, tmp_path / "lr.onnx")
    np.save(tmp_path / "docs.npy", np.array(DOCS).reshape(-1, 1))
    model, data = str(tmp_path / "lr.onnx"), str(tmp_path / "docs.npy")
    r = CliRunner().invoke(main, ["params", model, data, "--of", "probabilities", "-o", str(tmp_path / "G.npy"), "-q"])
    assert r.exit_code == 0, r.output
    names = [c["name"] for c in json.loads((tmp_path / "G.columns.json").read_text())["columns"]]
    assert names == ["idf", "LinearClassifier.coefficients", "LinearClassifier.intercepts"]
    r = CliRunner().invoke(main, ["check", model, data, "--params", "--of", "probabilities"])
    assert r.exit_code == 0 and "against onnxruntime's central differences" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize("pattern", ["\\pL+", "[[:^alpha:]]+", "[[:foo:]]"])
def test_a_pattern_python_cannot_run_is_refused_in_one_line(pattern):
    """RE2 syntax that Python's re lacks (Unicode classes, negated or unknown POSIX classes) is
    refused in one line naming the pattern, not run as something else."""
    from jaccli import walk
    from jaccli.errors import JaccliError
    from jaccli.plan import Plan

    x = _texts(DOCS[:2])
    m = _single("Tokenizer", {"mark": 0, "pad_value": "#", "mincharnum": 1, "tokenexp": pattern}, x, TensorProto.STRING,
                domain="com.microsoft")
    with pytest.raises(JaccliError) as e:
        walk.primal(Plan(jaccli.load(m), "y", [], np.float32), {"x": x})
    assert "\n" not in str(e.value) and pattern in str(e.value) and "jaccli can run" in str(e.value)
