"""Writes a ResNet-50 v1.5 ONNX model with seeded random weights.

No model hub is reachable, so benchmarks use a network with ResNet-50's exact layers,
shapes and compute (torchvision layout: stride on the 3x3 conv of each bottleneck) and
random weights. Input "input" FP32 [N,3,224,224], output "logits" FP32 [N,1000].

usage: gen_resnet50.py OUT_PATH [--seed N]
"""
import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.weights, self.params = [], [], 0
        self.n = 0

    def name(self, prefix):
        self.n += 1
        return f"{prefix}{self.n}"

    def weight(self, prefix, array):
        name = self.name(prefix)
        self.weights.append(numpy_helper.from_array(array.astype(np.float32), name))
        self.params += array.size
        return name

    def conv_bn(self, x, cin, cout, k, stride, relu=True):
        # He initialisation keeps activations in range through 50 layers.
        w = self.rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))
        conv = self.name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv", [x, self.weight("w", w)], [conv],
                kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
            )
        )
        bn = self.name("bn")
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [
                    conv,
                    self.weight("gamma", self.rng.uniform(0.5, 1.0, cout)),
                    self.weight("beta", self.rng.normal(0, 0.1, cout)),
                    self.weight("mean", self.rng.normal(0, 0.1, cout)),
                    self.weight("var", self.rng.uniform(0.5, 1.5, cout)),
                ],
                [bn],
                epsilon=1e-5,
            )
        )
        if not relu:
            return bn
        out = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [bn], [out]))
        return out

    def bottleneck(self, x, cin, width, stride):
        cout = width * 4
        y = self.conv_bn(x, cin, width, 1, 1)
        y = self.conv_bn(y, width, width, 3, stride)
        y = self.conv_bn(y, width, cout, 1, 1, relu=False)
        shortcut = x if (stride == 1 and cin == cout) else self.conv_bn(x, cin, cout, 1, stride, relu=False)
        add, out = self.name("add"), self.name("relu")
        self.nodes.append(helper.make_node("Add", [y, shortcut], [add]))
        self.nodes.append(helper.make_node("Relu", [add], [out]))
        return out, cout


def build(seed):
    b = Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, 2)
    pool = b.name("pool")
    b.nodes.append(helper.make_node("MaxPool", [x], [pool], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, c = pool, 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            x, c = b.bottleneck(x, c, width, stride if i == 0 else 1)
    gap, flat = b.name("gap"), b.name("flat")
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], [gap]))
    b.nodes.append(helper.make_node("Flatten", [gap], [flat], axis=1))
    fc_w = b.weight("fc_w", b.rng.normal(0, np.sqrt(1.0 / c), (c, 1000)))
    fc_b = b.weight("fc_b", np.zeros(1000))
    b.nodes.append(helper.make_node("Gemm", [flat, fc_w, fc_b], ["logits"]))
    graph = helper.make_graph(
        b.nodes,
        "resnet50_v1.5_random",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        b.weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sluice")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, b.params


def check(path, seed):
    """Runs the saved model in ONNX Runtime: batch 1 and 4 give finite logits that depend
    on the input, and a batch equals its items run one by one (what a batching server relies on)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed + 1).standard_normal((4, 3, 224, 224)).astype(np.float32)
    batch = sess.run(["logits"], {"input": x})[0]
    items = np.concatenate([sess.run(["logits"], {"input": x[i : i + 1]})[0] for i in range(4)])
    assert batch.shape == (4, 1000) and items.shape == (4, 1000), (batch.shape, items.shape)
    assert np.isfinite(batch).all() and np.isfinite(items).all(), "non-finite logits"
    assert not np.allclose(batch[0], batch[1]), "logits do not depend on the input"
    diff = float(np.abs(batch - items).max())
    assert np.allclose(batch, items, rtol=1e-4, atol=1e-4), f"batch differs from items by {diff}"
    print(f"checked in onnxruntime: |logits| <= {np.abs(batch).max():.1f}, batch vs items max diff {diff:.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=50)
    args = ap.parse_args()
    model, params = build(args.seed)
    onnx.save(model, args.out)
    print(f"wrote {args.out}: {params:,} parameters")
    check(args.out, args.seed)


if __name__ == "__main__":
    main()
