"""If and Loop: sub-graphs that read outer values (data and parameters), conditions and trip
counts read at run time. Forward against onnxruntime; input Jacobians (both modes) and
per-sample parameter Jacobians against float64 central differences of our forward."""

import numpy as np
import pytest
from gradcheck import N, batch_at_once, check_whole_model, one_input_model, ort_forward, our_forward, rel_err
from onnx import TensorProto, helper, numpy_helper

import jaccli
from jaccli.errors import ModelError

rng = np.random.default_rng(3)
F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def _if_model(threshold):
    """y = tanh(x @ A) * 2 if x has more than `threshold` features, else x @ B + c; the branches
    read the outer x, A, B and c, and the condition comes from x's shape."""
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["t0"]), helper.make_node("Tanh", ["t0"], ["t1"]),
         helper.make_node("Mul", ["t1", "two"], ["then_out"])],
        "then", [], [helper.make_tensor_value_info("then_out", F, None)], [_init("two", np.float32(2.0))])
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["e0"]), helper.make_node("Add", ["e0", "c"], ["else_out"])],
        "else", [], [helper.make_tensor_value_info("else_out", F, None)])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["d"], axis=0),
             helper.make_node("Greater", ["d", "k"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [_init("one", np.int64(1)), _init("k", np.int64(threshold)),
             _init("A", rng.standard_normal((5, 3)).astype(np.float32)),
             _init("B", rng.standard_normal((5, 3)).astype(np.float32)),
             _init("c", rng.standard_normal(3).astype(np.float32))]
    return one_input_model(nodes, inits, (5,))


@pytest.mark.parametrize("threshold,taken", [(4, {"A"}), (6, {"B", "c"})])
def test_if_takes_the_branch_of_its_runtime_condition(threshold, taken):
    m = _if_model(threshold)
    x = rng.standard_normal((N, 5))
    assert check_whole_model(m, x) == ["A", "B", "c"]
    G, cols = jaccli.param_jacobian(m, x)
    for c in cols:  # the other branch's parameters: zero columns
        block = G[..., c["offset"]: c["offset"] + c["size"]]
        assert (np.abs(block).max() > 0) == (c["name"] in taken), c["name"]


def _rnn_model(scan=True):
    """h_t = tanh(x_t W + h_{t-1} U + b) over the time axis of x (N, T, D): a Loop with a trip
    count from x's shape, the state carried, the states scanned (then summed over time)."""
    body_nodes = [
        helper.make_node("Gather", ["x", "i"], ["xt"], axis=1),
        helper.make_node("MatMul", ["xt", "W"], ["a"]),
        helper.make_node("MatMul", ["h_in", "U"], ["b_"]),
        helper.make_node("Sum", ["a", "b_", "bias"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_out"]),
        helper.make_node("Identity", ["c_in"], ["c_out"]),
        helper.make_node("Identity", ["h_out"], ["h_scan"]),
    ]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c_in", B, []),
         helper.make_tensor_value_info("h_in", F, None)],
        [helper.make_tensor_value_info("c_out", B, []), helper.make_tensor_value_info("h_out", F, None),
         helper.make_tensor_value_info("h_scan", F, None)])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["T"], axis=0),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]), helper.make_node("Concat", ["n1", "H"], ["hs"], axis=0),
             helper.make_node("ConstantOfShape", ["hs"], ["h0"], value=helper.make_tensor("v", F, [1], [0.0])),
             helper.make_node("Loop", ["T", "", "h0"], ["h_last", "hs_all"], body=body)]
    if scan:  # (T, N, H): the sample axis is second; sum over time, then the last state
        nodes += [helper.make_node("ReduceSum", ["hs_all", "axes0"], ["ssum"], keepdims=0),
                  helper.make_node("Add", ["ssum", "h_last"], ["y"])]
    else:
        nodes += [helper.make_node("Identity", ["h_last"], ["y"])]
    inits = [_init("one", np.int64(1)), _init("zero", np.int64(0)), _init("axes0", np.array([0], np.int64)),
             _init("H", np.array([3], np.int64)), _init("W", 0.5 * rng.standard_normal((2, 3)).astype(np.float32)),
             _init("U", 0.5 * rng.standard_normal((3, 3)).astype(np.float32)),
             _init("bias", 0.1 * rng.standard_normal(3).astype(np.float32))]
    return one_input_model(nodes, inits, (4, 2))


@pytest.mark.parametrize("scan", [False, True])
def test_loop_recurrence(scan):
    names = check_whole_model(_rnn_model(scan), rng.standard_normal((N, 4, 2)))
    assert names == ["W", "U", "bias"]



def test_loop_with_a_condition_and_no_trip_count():
    """while s < 3: s = s + |x| (elementwise sum over the features); the count depends on the data of
    the whole block, and the carried value is the only output."""
    body = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["ax"]), helper.make_node("ReduceSum", ["ax"], ["r"], keepdims=0),
         helper.make_node("Add", ["s_in", "w"], ["s_w"]), helper.make_node("Add", ["s_w", "r"], ["s_out"]),
         helper.make_node("ReduceMin", ["s_out"], ["m"], keepdims=0), helper.make_node("Less", ["m", "three"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c_in", B, []),
                 helper.make_tensor_value_info("s_in", F, None)],
        [helper.make_tensor_value_info("c_out", B, []), helper.make_tensor_value_info("s_out", F, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s0"], keepdims=0, axes=[1]),
             helper.make_node("Loop", ["", "true", "s0"], ["y"], body=body)]
    inits = [_init("true", np.array(True)), _init("three", np.float32(3.0)), _init("w", np.float32(0.25))]
    m = one_input_model(nodes, inits, (4,), opset=11)
    x = rng.uniform(0.1, 0.3, (N, 4))
    feeds = {"x": x}
    ref, _ = ort_forward(m, feeds)
    np.testing.assert_allclose(our_forward(m, feeds, np.float32), ref, rtol=1e-5)
    # the block's condition depends on every sample: the drivers' pairing probe refuses it
    with pytest.raises(Exception, match="mixes samples|changes when another sample"):
        jaccli.input_jacobian(m, feeds)
    x1 = x[:1]
    J = jaccli.input_jacobian(m, x1, dtype=np.float64, flat=True)  # one sample: well defined
    eps, E = 1e-6, np.eye(4)
    fd = [(our_forward(m, {"x": x1 + eps * e}) - our_forward(m, {"x": x1 - eps * e})).ravel() / (2 * eps) for e in E]
    assert rel_err(J[0], np.stack(fd, axis=-1)) < 1e-6


def test_unsupported_operator_inside_a_branch_is_named():
    m = _if_model(4)
    m.graph.node[3].attribute[0].g.node[1].op_type = "Frobnicate"
    with pytest.raises(Exception, match="Frobnicate"):
        jaccli.input_jacobian(m, rng.standard_normal((N, 5)))


def test_loop_that_never_ends_is_stopped(monkeypatch):
    import jaccli.rules.control as control

    monkeypatch.setattr(control, "MAX_ITERATIONS", 50)
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Neg", ["v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c_in", B, []),
                 helper.make_tensor_value_info("v_in", F, None)],
        [helper.make_tensor_value_info("c_out", B, []), helper.make_tensor_value_info("v_out", F, None)])
    m = one_input_model([helper.make_node("Loop", ["", "true", "x"], ["y"], body=body)], [_init("true", np.array(True))], (2,))
    with pytest.raises(ModelError, match="50 iterations"):
        jaccli.input_jacobian(m, rng.standard_normal((N, 2)))


def _recurrence_body():
    """A Scan body: h_t = tanh(x_t W + h_{t-1} U + r_t V), the new state also scanned out."""
    return helper.make_graph(
        [helper.make_node("MatMul", ["xt", "W"], ["a"]), helper.make_node("MatMul", ["h_in", "U"], ["b_"]),
         helper.make_node("MatMul", ["rt", "V"], ["c_"]), helper.make_node("Sum", ["a", "b_", "c_"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["h_out"]), helper.make_node("Identity", ["h_out"], ["h_scan"])],
        "body", [helper.make_tensor_value_info(n, F, None) for n in ("h_in", "xt", "rt")],
        [helper.make_tensor_value_info(n, F, None) for n in ("h_out", "h_scan")])


def _scan_model(directions=(0, 0), out_axis=0, out_direction=0):
    """h_t = tanh(x_t W + h_{t-1} U) scanned over x's time axis (scan axis 1 of (N, T, D), so the
    slices keep the sample axis); a second scan input, x reversed, adds x_{T-1-t} V; outputs
    the final state plus the scanned states weighted by time step."""
    body = _recurrence_body()
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["m", "P"], ["h0"]),
             helper.make_node("Scan", ["h0", "x", "x"], ["h_last", "hs"], body=body, num_scan_inputs=2,
                              scan_input_axes=[1, 1], scan_input_directions=list(directions), scan_output_axes=[out_axis],
                              scan_output_directions=[out_direction]),
             helper.make_node("Transpose", ["hs"], ["hst"], perm=[1, 2, 0] if out_axis == 0 else [0, 2, 1]),
             helper.make_node("MatMul", ["hst", "steps"], ["s"]),
             helper.make_node("Add", ["s", "h_last"], ["y"])]
    inits = [_init(k, 0.5 * rng.standard_normal(s).astype(np.float32)) for k, s in
             (("W", (2, 3)), ("U", (3, 3)), ("V", (2, 3)), ("P", (2, 3)))] + [_init("steps", np.arange(1.0, 5.0, dtype=np.float32))]
    return one_input_model(nodes, inits, (4, 2), opset=11)


@pytest.mark.parametrize("directions,out_axis,out_direction", [((0, 1), 0, 0), ((1, 0), 1, 1)])
def test_scan(directions, out_axis, out_direction):
    """out_axis 1 stacks time after the samples; directions read a scan input backwards and
    write a scanned output backwards."""
    m = _scan_model(directions, out_axis, out_direction)
    assert check_whole_model(m, rng.standard_normal((N, 4, 2))) == ["W", "U", "V", "P", "steps"]


@pytest.mark.parametrize("intercept", [False, True])
def test_scan_over_a_parameter(intercept):
    """scikit-learn's distances to training points: the samples are Scan's state and the training
    points (a parameter) its scan input, one row per iteration; each sample's cotangent of them
    is its own. With a (1, 1) intercept added to the (N,) result, as a GP's mean has it, that
    makes (1, N), the sample axis no longer first: such a graph runs one sample at a time."""
    body = helper.make_graph(
        [helper.make_node("Sub", ["s_in", "row"], ["d"]), helper.make_node("Mul", ["d", "d"], ["d2"]),
         helper.make_node("ReduceSum", ["d2"], ["dist"], axes=[1], keepdims=0), helper.make_node("Identity", ["s_in"], ["s_out"])],
        "body", [helper.make_tensor_value_info(n, F, None) for n in ("s_in", "row")],
        [helper.make_tensor_value_info(n, F, None) for n in ("s_out", "dist")])
    nodes = [helper.make_node("Scan", ["x", "P"], ["x_last", "D"], body=body, num_scan_inputs=1),
             helper.make_node("Transpose", ["D"], ["Dt"], perm=[1, 0]), helper.make_node("Neg", ["Dt"], ["nd"]),
             helper.make_node("Exp", ["nd"], ["K"]), helper.make_node("MatMul", ["K", "alpha"], ["mean"])]
    inits = {"P": 0.5 * rng.standard_normal((5, 3)), "alpha": rng.standard_normal(5)}
    if intercept:
        nodes += [helper.make_node("Add", ["mean", "c"], ["row_mean"]), helper.make_node("Reshape", ["row_mean", "shape"], ["y"])]
        inits.update(c=np.array([[0.25]]), shape=np.array([-1, 1], np.int64))
    else:
        nodes += [helper.make_node("Identity", ["mean"], ["y"])]
    inits = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in inits.items()}
    names = check_whole_model(one_input_model(nodes, inits, (3,), opset=11), rng.standard_normal((N, 3)))
    assert names == ["P", "alpha", "c"][: 3 if intercept else 2]


def _weights_inside(m, graph_name):
    """Model m with the float parameters that only sub-graph `graph_name` reads moved into it as
    its own initializers, as jax2onnx writes a fori_loop's weights into the body."""
    from onnx import ModelProto

    out = ModelProto()
    out.CopyFrom(m)
    sub = next(a.g for n in out.graph.node for a in n.attribute if a.type == a.GRAPH and a.g.name == graph_name)
    inside, outside = {v for n in sub.node for v in n.input}, {v for n in out.graph.node for v in n.input}
    floats = [t for t in out.graph.initializer if t.data_type == F and t.name in inside and t.name not in outside]
    sub.initializer.extend(floats)
    for t in floats:
        out.graph.initializer.remove(t)
    return out


@pytest.mark.parametrize("make,where", [(_rnn_model, "body"), (_scan_model, "body")])
def test_weights_inside_a_body_are_parameters(make, where):
    """A Loop's or Scan's weights kept as its body's initializers are parameters of the model,
    read by the body from outside: the same columns, under the same names, as the model that
    holds them in the main graph; forward against onnxruntime and derivatives against
    differences (check_whole_model), and check passes."""
    outer = make()
    inner = _weights_inside(outer, where)
    moved = len(outer.graph.initializer) - len(inner.graph.initializer)
    assert moved == 3
    x = rng.standard_normal((N, 4, 2))
    names = check_whole_model(inner, x)
    G, cols = jaccli.param_jacobian(inner, x)
    G_want, cols_want = jaccli.param_jacobian(outer, x)
    assert sorted(names) == sorted(c["name"] for c in cols_want) and jaccli.load(inner).hoisted_weights == moved
    at = {c["name"]: G[..., c["offset"]:c["offset"] + c["size"]] for c in cols}
    for c in cols_want:
        np.testing.assert_allclose(at[c["name"]], G_want[..., c["offset"]:c["offset"] + c["size"]], rtol=1e-6, atol=1e-7)
    r = jaccli.check(inner, x, params=True)  # onnxruntime fed them as the parameters they are (not our own forward)
    assert r["ok"] and r["oracle"] == "onnxruntime"


def test_weights_of_one_name_in_two_branches():
    """Each branch of an If keeps a weight named w as its own initializer (ONNX asks for names
    unique in the whole model; sibling scopes repeat them in practice): both become parameters,
    each under its branch's name, each read by its branch; the branch taken has the derivative,
    the other's columns are zero."""
    def branch(name, scale):
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], [f"{name}_out"])],
            name, [], [helper.make_tensor_value_info(f"{name}_out", F, None)],
            [_init("w", (scale * rng.standard_normal((3, 2))).astype(np.float32))])

    m = one_input_model([helper.make_node("If", ["yes"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 0.5))],
                        [_init("yes", np.array(True))], (3,))
    assert sorted(check_whole_model(m, rng.standard_normal((N, 3)))) == ["else/w", "then/w"]
    G, cols = jaccli.param_jacobian(m, rng.standard_normal((N, 3)))
    for c in cols:
        assert G[..., c["offset"]:c["offset"] + c["size"]].any() == (c["name"] == "then/w")


@pytest.mark.parametrize("inside", [False, True])
def test_a_loop_over_a_time_major_sequence(inside):
    """tf2onnx and jax2onnx pass a recurrence its sequence time-major, (T, N, D), from outside
    the Loop's body, which gathers step t: what the body's parameters meet has the samples
    first, so the parameter Jacobian runs the batch at once, equal to differences and to runs
    of one sample. Where a parameter of the body meets the time-major sequence itself (its
    rows are not the samples), the whole model runs one sample at a time."""
    body_nodes = [helper.make_node("Gather", ["seq", "i"], ["xt"], axis=0),
                  helper.make_node("MatMul", ["xt", "W"], ["a"]), helper.make_node("MatMul", ["h_in", "U"], ["b_"]),
                  helper.make_node("Add", ["a", "b_"], ["pre"]), helper.make_node("Tanh", ["pre"], ["h0_out"]),
                  helper.make_node("Identity", ["c_in"], ["c_out"])]
    if inside:  # a parameter applied to the whole time-major sequence, in every iteration
        body_nodes += [helper.make_node("MatMul", ["seq", "V"], ["sv"]), helper.make_node("ReduceSum", ["sv", "axes0"], ["s"], keepdims=0),
                       helper.make_node("Add", ["h0_out", "s"], ["h_out"])]
    else:
        body_nodes += [helper.make_node("Identity", ["h0_out"], ["h_out"])]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c_in", B, []),
         helper.make_tensor_value_info("h_in", F, None)],
        [helper.make_tensor_value_info("c_out", B, []), helper.make_tensor_value_info("h_out", F, None)])
    nodes = [helper.make_node("Transpose", ["x"], ["seq"], perm=[1, 0, 2]), helper.make_node("Shape", ["seq"], ["s0"]),
             helper.make_node("Gather", ["s0", "zero"], ["T"], axis=0),
             helper.make_node("ReduceMean", ["x"], ["h0"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["h0", "P"], ["h_init"]),
             helper.make_node("Loop", ["T", "", "h_init"], ["y"], body=body)]
    inits = [_init("zero", np.int64(0)), _init("axes0", np.array([0], np.int64)),
             _init("W", 0.5 * rng.standard_normal((2, 3)).astype(np.float32)),
             _init("U", 0.5 * rng.standard_normal((3, 3)).astype(np.float32)),
             _init("P", 0.5 * rng.standard_normal((2, 3)).astype(np.float32))]
    if inside:
        inits.append(_init("V", 0.5 * rng.standard_normal((2, 3)).astype(np.float32)))
    batch_at_once(one_input_model(nodes, inits, (4, 2)), rng.standard_normal((N, 4, 2)),
                  ["W", "U", "P"] + (["V"] if inside else []), at_once=not inside)


def test_a_scan_over_a_time_major_sequence():
    """A Scan along axis 0 of a time-major (T, N, D) sequence: its slices have the samples
    first, so the parameter Jacobian runs the batch at once, equal to differences and to runs
    of one sample."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["xt", "W"], ["a"]), helper.make_node("MatMul", ["h_in", "U"], ["b_"]),
         helper.make_node("Add", ["a", "b_"], ["pre"]), helper.make_node("Tanh", ["pre"], ["h_out"]),
         helper.make_node("Identity", ["h_out"], ["h_scan"])],
        "body", [helper.make_tensor_value_info(n, F, None) for n in ("h_in", "xt")],
        [helper.make_tensor_value_info(n, F, None) for n in ("h_out", "h_scan")])
    nodes = [helper.make_node("Transpose", ["x"], ["seq"], perm=[1, 0, 2]),
             helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0), helper.make_node("MatMul", ["m", "P"], ["h0"]),
             helper.make_node("Scan", ["h0", "seq"], ["y", "hs"], body=body, num_scan_inputs=1)]
    inits = [_init(k, 0.5 * rng.standard_normal(s).astype(np.float32)) for k, s in (("W", (2, 3)), ("U", (3, 3)), ("P", (2, 3)))]
    batch_at_once(one_input_model(nodes, inits, (4, 2), opset=11), rng.standard_normal((N, 4, 2)), ["W", "U", "P"])


def test_a_float32_initial_state_leaves_a_float64_run_in_float64():
    """A Scan whose initial state is a ConstantOfShape's zeros, float32 whatever the data: in a
    float64 run its body runs in float64 too (the widest float type among its inputs), Casts to
    float included. The body took the first float input's type, float32, its Casts rounded to
    it, and a float64 Jacobian came out with float32 rounding (onnx's expanded LinearAttention:
    10% off float64 differences)."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["xt", "W"], ["a"]), helper.make_node("MatMul", ["h_in", "U"], ["b_"]),
         helper.make_node("Add", ["a", "b_"], ["pre"]), helper.make_node("Cast", ["pre"], ["pre32"], to=TensorProto.FLOAT),
         helper.make_node("Tanh", ["pre32"], ["h_out"]),
         helper.make_node("Identity", ["h_out"], ["h_scan"])],
        "body", [helper.make_tensor_value_info(n, F, None) for n in ("h_in", "xt")],
        [helper.make_tensor_value_info(n, F, None) for n in ("h_out", "h_scan")])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
             helper.make_node("Concat", ["n", "three"], ["shape"], axis=0), helper.make_node("ConstantOfShape", ["shape"], ["h0"]),
             helper.make_node("Transpose", ["x"], ["seq"], perm=[1, 0, 2]),
             helper.make_node("Scan", ["h0", "seq"], ["y", "hs"], body=body, num_scan_inputs=1)]
    inits = [_init(k, 0.5 * rng.standard_normal(s).astype(np.float32)) for k, s in (("W", (2, 3)), ("U", (3, 3)))]
    inits += [_init(k, np.array([v], np.int64)) for k, v in (("zero", 0), ("one", 1), ("three", 3))]
    assert check_whole_model(one_input_model(nodes, inits, (4, 2), opset=11), rng.standard_normal((N, 4, 2))) == ["W", "U"]


@pytest.mark.parametrize("opset", [15, 18])
@pytest.mark.parametrize("empty", [False, True])
def test_an_optional_tested_and_unwrapped(empty, opset):
    """TorchScript's `if v is not None` on an Optional[Tensor]: Optional wraps tanh(x) (or,
    `empty`, nothing), OptionalHasElement chooses the branch, and OptionalGetElement unwraps it
    inside: y = tanh(tanh(x) @ W), else tanh(x @ W2). Forward as onnxruntime's; Jacobians as
    differences; the branch not taken leaves its parameter's columns zero."""
    tensor = helper.make_tensor_type_proto(F, None)
    then_g = helper.make_graph([helper.make_node("OptionalGetElement", ["o"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["t"])],
                               "then", [], [helper.make_tensor_value_info("t", F, ["N", 3])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W2"], ["t2"])], "else", [],
                               [helper.make_tensor_value_info("t2", F, ["N", 3])])
    wrap = (helper.make_node("Optional", [], ["o"], type=helper.make_optional_type_proto(tensor).optional_type.elem_type)
            if empty else helper.make_node("Optional", ["a"], ["o"]))
    nodes = [helper.make_node("Tanh", ["x"], ["a"]), wrap, helper.make_node("OptionalHasElement", ["o"], ["has"]),
             helper.make_node("If", ["has"], ["y0"], then_branch=then_g, else_branch=else_g), helper.make_node("Tanh", ["y0"], ["y"])]
    inits = {"W": rng.standard_normal((4, 3)).astype(np.float32), "W2": rng.standard_normal((4, 3)).astype(np.float32)}
    m = one_input_model(nodes, inits, (4,), opset)
    x = rng.standard_normal((N, 4))
    assert check_whole_model(m, x) == ["W", "W2"]
    G, cols = jaccli.param_jacobian(m, x)
    assert [bool(G[..., c["offset"]: c["offset"] + c["size"]].any()) for c in cols] == ([False, True] if empty else [True, False])


def test_constants_a_body_reads_without_a_derivative_are_no_parameters():
    """tf2onnx's crop_and_resize: a Loop over the boxes whose body crops with a Resize
    (tf_crop_and_resize) and builds each box's roi from float constants of the outer graph.
    Those constants reach the Loop as inputs, but inside they land only in the roi, which
    carries no derivative: they are no parameters (they were, and the crop box's derivative,
    not written, then refused the parameter Jacobian). The weights after the Loop are."""
    n = helper.make_node
    body = helper.make_graph(
        [n("Concat", ["lo", "hi"], ["roi"], axis=0),
         n("Resize", ["x", "roi", "", "sizes"], ["r"], mode="linear", coordinate_transformation_mode="tf_crop_and_resize",
           axes=[2, 3]),
         n("Identity", ["c"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c", B, [])],
        [helper.make_tensor_value_info("c_out", B, []), helper.make_tensor_value_info("r", F, None)])
    nodes = [n("Loop", ["two", ""], ["s"], body=body), n("ReduceSum", ["s", "axis0"], ["t"], keepdims=0),
             n("Reshape", ["t", "flat"], ["f"]), n("MatMul", ["f", "W"], ["y"])]
    inits = {"two": np.array(2, np.int64), "axis0": np.array([0], np.int64), "sizes": np.array([3, 4], np.int64),
             "lo": np.array([0.1, -0.2], np.float32), "hi": np.array([0.9, 1.1], np.float32),
             "flat": np.array([-1, 12], np.int64), "W": rng.standard_normal((12, 2)).astype(np.float32)}
    m = one_input_model(nodes, inits, (1, 5, 6), opset=18)
    assert check_whole_model(m, rng.standard_normal((N, 1, 5, 6))) == ["W"]


@pytest.mark.parametrize("directions", [(0, 1), (1, 0)])
@pytest.mark.parametrize("lengths", [False, True])
def test_scan_at_opset_8(directions, lengths):
    """Scan at opset 8 is batched: its state (N, H) and scan inputs (N, T, D) carry the batch on
    axis 0, and the body (h_t = tanh(x_t W + h U + r_t V), x read forwards and backwards) runs on
    each element's own slices, without the batch axis. Forward as onnxruntime's; Jacobians,
    the body's weights' per sample too, as differences. Sequence lengths equal to the inputs'
    are taken (as ONNX's default); shorter ones are refused in one line."""
    body = _recurrence_body()
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0), helper.make_node("MatMul", ["m", "P"], ["h0"]),
             helper.make_node("Scan", ["lens" if lengths else "", "h0", "x", "x"], ["h_last", "hs"], body=body,
                              num_scan_inputs=2, directions=list(directions)),
             helper.make_node("Transpose", ["hs"], ["hst"], perm=[0, 2, 1]), helper.make_node("MatMul", ["hst", "steps"], ["s"]),
             helper.make_node("Add", ["s", "h_last"], ["y"])]
    inits = [_init(k, 0.5 * rng.standard_normal(s).astype(np.float32)) for k, s in
             (("W", (2, 3)), ("U", (3, 3)), ("V", (2, 3)), ("P", (2, 3)))] + [_init("steps", np.arange(1.0, 5.0, dtype=np.float32))]
    m = one_input_model(nodes, inits, (4, 2), opset=8)
    x = rng.standard_normal((N, 4, 2))
    if lengths:
        m.graph.input.append(helper.make_tensor_value_info("lens", I64, ["N"]))
        for full, ok in ((4, True), (3, False)):
            feeds = {"x": x, "lens": np.full(N, full, np.int64)}
            if ok:
                J = jaccli.input_jacobian(m, feeds, dtype=np.float64)
                np.testing.assert_allclose(J, jaccli.input_jacobian(_without_lengths(m), x, dtype=np.float64), rtol=1e-12)
            else:
                with pytest.raises(jaccli.errors.UnsupportedOpError, match="sequence lengths") as e:
                    jaccli.input_jacobian(m, feeds)
                assert "\n" not in str(e.value)
        return
    assert check_whole_model(m, x) == ["W", "U", "V", "P", "steps"]


def _without_lengths(m):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(m)
    out.graph.node[2].input[0] = ""
    del out.graph.input[1:]
    return out
