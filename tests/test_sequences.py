"""Sequence operators, as scripted loops and list code export them: forward against onnxruntime,
derivatives (both modes, per-sample parameters) against float64 central differences."""

import numpy as np
import pytest
from gradcheck import N, check_whole_model, one_input_model
from onnx import TensorProto, helper

rng = np.random.default_rng(5)


W = rng.standard_normal((6,)).astype(np.float32)


@pytest.mark.parametrize("new_axis", [0, 1])
def test_split_pick_and_concatenate(new_axis):
    """Split x * W (N, 6) into pieces of 2, 1 and 3 along axis 1; the middle one's tanh, inserted
    first; the pieces back together (stacked when new_axis; then all pieces must agree in shape)."""
    sizes = [2, 2, 2] if new_axis else [2, 1, 3]
    nodes = [helper.make_node("Mul", ["x", "W"], ["xw"]),
             helper.make_node("SplitToSequence", ["xw", "sizes"], ["seq"], axis=1),
             helper.make_node("SequenceAt", ["seq", "one"], ["mid"]),
             helper.make_node("Tanh", ["mid"], ["t"]),
             helper.make_node("SequenceInsert", ["seq", "t", "zero"], ["seq2"]),
             helper.make_node("SequenceErase", ["seq2", "minus1"], ["seq3"]),
             helper.make_node("ConcatFromSequence", ["seq3"], ["y"], axis=1, new_axis=new_axis)]
    inits = {"W": W, "sizes": np.array(sizes, np.int64), "one": np.int64(1), "zero": np.int64(0), "minus1": np.int64(-1)}
    assert check_whole_model(one_input_model(nodes, inits, (6,)), rng.standard_normal((N, 6))) == ["W"]


def test_construct_length_and_slices():
    """SequenceConstruct of two values; x split into its slices (keepdims 0) and stacked again;
    SequenceLength folded into a scale."""
    nodes = [helper.make_node("Mul", ["x", "W"], ["xw"]), helper.make_node("Sin", ["x"], ["s"]),
             helper.make_node("SequenceConstruct", ["xw", "s"], ["pair"]),
             helper.make_node("SequenceLength", ["pair"], ["n"]), helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("ConcatFromSequence", ["pair"], ["both"], axis=1),
             helper.make_node("SplitToSequence", ["both"], ["cols"], axis=1, keepdims=0),
             helper.make_node("ConcatFromSequence", ["cols"], ["stacked"], axis=-1, new_axis=1),
             helper.make_node("Mul", ["stacked", "nf"], ["y"])]
    assert check_whole_model(one_input_model(nodes, {"W": W}, (6,)), rng.standard_normal((N, 6))) == ["W"]


def test_loop_appending_to_a_sequence():
    """for i in range(3): outs.append(tanh(x * W * (i + 1))); then the list stacked: a Loop that
    carries a sequence, built from SequenceEmpty."""
    F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=F), helper.make_node("Add", ["fi", "one_f"], ["k"]),
         helper.make_node("Mul", ["x", "W"], ["xw"]), helper.make_node("Mul", ["xw", "k"], ["a"]),
         helper.make_node("Tanh", ["a"], ["t"]), helper.make_node("SequenceInsert", ["seq_in", "t"], ["seq_out"]),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c_in", B, []),
                 helper.make_tensor_sequence_value_info("seq_in", F, None)],
        [helper.make_tensor_value_info("c_out", B, []), helper.make_tensor_sequence_value_info("seq_out", F, None)])
    nodes = [helper.make_node("SequenceEmpty", [], ["empty"], dtype=F),
             helper.make_node("Loop", ["three", "", "empty"], ["seq"], body=body),
             helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=1, new_axis=1)]
    inits = {"W": W, "three": np.int64(3), "one_f": np.float32(1.0)}
    assert check_whole_model(one_input_model(nodes, inits, (6,)), rng.standard_normal((N, 6))) == ["W"]
