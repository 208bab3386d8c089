"""Writes a small classifier with ResNet-50's interface, as ONNX, with seeded random weights.

The detect_route_classify example sends crops of most classes to this model and
people to ResNet-50: a light and a heavy classifier behind one route. Its network is
small (two strided convs, global pooling, a linear layer), its weights random:
input "input" FP32 [N,3,224,224] -> "logits" FP32 [N,1000].

usage: gen_small_classifier.py OUT_PATH [--seed N]
"""
import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(seed):
    rng = np.random.default_rng(seed)
    nodes, weights = [], []

    def weight(name, array):
        weights.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    x, cin = "input", 3
    for i, cout in enumerate([16, 32]):
        w = rng.normal(0, np.sqrt(2.0 / (cin * 9)), (cout, cin, 3, 3))
        nodes.append(helper.make_node("Conv", [x, weight(f"w{i}", w), weight(f"b{i}", np.zeros(cout))], [f"conv{i}"],
                                      kernel_shape=[3, 3], strides=[4, 4], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"act{i}"]))
        x, cin = f"act{i}", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"]))
    fc = rng.normal(0, np.sqrt(1.0 / cin), (cin, 1000))
    nodes.append(helper.make_node("MatMul", ["flat", weight("fc", fc)], ["mm"]))
    nodes.append(helper.make_node("Add", ["mm", weight("fc_b", np.zeros(1000))], ["logits"]))
    graph = helper.make_graph(
        nodes, "small_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    onnx.save(build(args.seed), args.out)
