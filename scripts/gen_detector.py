"""Writes a small YOLO-shaped detector as ONNX, with seeded random weights.

No model hub is reachable, so the detect_crop_classify example runs a detector with a
real detector's shape and cost profile but random weights: its boxes mean nothing.
A strided conv backbone (320 -> 20x20 cells), a 1x1 head with 3 anchors per cell, and
an in-graph decode to YOLOv5's output layout:
input "images" FP32 [N,3,320,320] -> "predictions" FP32 [N,1200,85]
(centre x, centre y, width, height in input pixels, objectness, 80 class scores).

usage: gen_detector.py OUT_PATH [--seed N]
"""
import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE, CLASSES, ANCHORS = 320, 80, 3


def build(seed):
    rng = np.random.default_rng(seed)
    nodes, weights = [], []

    def weight(name, array):
        weights.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    x, cin = "images", 3
    # Five stride-2 3x3 convs: 320 -> 10; then back up one level is not needed, so stop
    # at stride 16 (20x20) with the fifth conv at stride 1.
    for i, (cout, stride) in enumerate([(16, 2), (32, 2), (64, 2), (128, 2), (256, 1)]):
        w = rng.normal(0, np.sqrt(2.0 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
        conv, act = f"conv{i}", f"act{i}"
        nodes.append(helper.make_node("Conv", [x, weight(f"w{i}", w), weight(f"b{i}", np.zeros(cout, np.float32))],
                                      [conv], kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [conv], [act]))
        x, cin = act, cout
    per = 5 + CLASSES
    w = rng.normal(0, np.sqrt(1.0 / cin), (ANCHORS * per, cin, 1, 1)).astype(np.float32)
    nodes.append(helper.make_node("Conv", [x, weight("head_w", w)], ["head"], kernel_shape=[1, 1]))
    cells = (SIZE // 16) ** 2
    # [N, A*per, 20, 20] -> [N, A, per, 400] -> [N, A, 400, per] -> [N, A*400, per]
    nodes.append(helper.make_node("Reshape", ["head", weight("s1", np.array([0, ANCHORS, per, cells], np.int64))], ["r1"]))
    nodes.append(helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 1, 3, 2]))
    nodes.append(helper.make_node("Reshape", ["t1", weight("s2", np.array([0, ANCHORS * cells, per], np.int64))], ["r2"]))
    nodes.append(helper.make_node("Sigmoid", ["r2"], ["sig"]))
    # Boxes in input pixels: centre and size scale with the input, scores stay in [0, 1].
    scale = np.ones(per, np.float32)
    scale[:4] = SIZE
    nodes.append(helper.make_node("Mul", ["sig", weight("scale", scale)], ["predictions"]))
    graph = helper.make_graph(
        nodes, "yolo_shaped_random",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["N", ANCHORS * cells, per])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sluice")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def check(path):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((2, 3, SIZE, SIZE), dtype=np.float32)
    out = sess.run(["predictions"], {"images": x})[0]
    assert out.shape == (2, 1200, 85) and np.isfinite(out).all(), out.shape
    one = sess.run(["predictions"], {"images": x[1:]})[0]
    assert np.allclose(out[1:], one, atol=1e-4), "a batch differs from its items"
    print(f"checked in onnxruntime: predictions {out.shape}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    onnx.save(build(args.seed), args.out)
    print(f"wrote {args.out}")
    check(args.out)


if __name__ == "__main__":
    main()
