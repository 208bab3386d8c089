"""The benchmark workloads as the Python servers' users would write them: the same ONNX
files, ONNX Runtime sessions with the same thread counts as sluice's model.yaml, and the
pipelines' steps in Pillow and NumPy inside predict. Shared by the MLServer runtime and the
KServe model of scripts/bench_peers.py (each imports it from its own venv).

A workload maps input arrays (batch first, as the V2 protocol carries them) to output
arrays. Its `inputs`/`outputs` are the V2 metadata perf_analyzer reads: the same names,
datatypes and shapes as sluice serves, so perf_analyzer sends every server the same bytes.
"""
import io
import os

import numpy as np
import onnxruntime as ort
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def decode(blob):
    return Image.open(io.BytesIO(bytes(blob))).convert("RGB")


def softmax_top5(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1)[:, :5]
    return np.take_along_axis(p, idx, axis=1).astype(np.float32), idx.astype(np.int64)


def classify_input(img):
    """torchvision's eval transform: shorter side to 256, centre crop 224, normalize, CHW."""
    w, h = img.size
    s = 256 / min(w, h)
    rw, rh = max(224, round(w * s)), max(224, round(h * s))
    img = img.resize((rw, rh), Image.BILINEAR)
    left, top = (rw - 224) // 2, (rh - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    return ((np.asarray(img, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)


def letterbox(img, size=320, pad=114):
    w, h = img.size
    scale = min(size / w, size / h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas = Image.new("RGB", (size, size), (pad, pad, pad))
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), (left, top))
    x = np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255
    return x, scale, left, top


def nms(boxes, scores, classes, iou_threshold=0.45, max_detections=8):
    """Greedy class-wise NMS, best first (the usual NumPy version)."""
    order = np.argsort(-scores)
    keep = []
    for i in order:
        if len(keep) == max_detections:
            break
        ok = True
        for k in keep:
            if classes[k] != classes[i]:
                continue
            x1, y1 = max(boxes[i, 0], boxes[k, 0]), max(boxes[i, 1], boxes[k, 1])
            x2, y2 = min(boxes[i, 2], boxes[k, 2]), min(boxes[i, 3], boxes[k, 3])
            inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
            if inter / (area(boxes[i]) + area(boxes[k]) - inter + 1e-9) > iou_threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return np.array(keep, np.int64)


def detections(pred, img, scale, left, top, score_threshold=0.25):
    """YOLOv5 rows (cx, cy, w, h, objectness, class scores) -> boxes in image pixels."""
    cls = pred[:, 5:].argmax(axis=1)
    score = pred[:, 4] * pred[np.arange(len(pred)), 5 + cls]
    m = score >= score_threshold
    p, score, cls = pred[m], score[m], cls[m]
    w, h = img.size
    x1 = np.clip((p[:, 0] - p[:, 2] / 2 - left) / scale, 0, w)
    y1 = np.clip((p[:, 1] - p[:, 3] / 2 - top) / scale, 0, h)
    x2 = np.clip((p[:, 0] + p[:, 2] / 2 - left) / scale, 0, w)
    y2 = np.clip((p[:, 1] + p[:, 3] / 2 - top) / scale, 0, h)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    keep = nms(boxes, score, cls)
    return boxes[keep].reshape(-1, 4), score[keep].astype(np.float32), cls[keep].astype(np.int64)


def t(name, datatype, shape):
    return {"name": name, "datatype": datatype, "shape": shape}


class Tiny:
    inputs = [t("x", "FP32", [-1, 4])]
    outputs = [t("y", "FP32", [-1, 4])]
    batchable = True

    def __init__(self, models):
        self.s = session(os.path.join(models, "tiny/model.onnx"), 1)

    def __call__(self, x):
        return {"y": self.s.run(None, {"x": x["x"]})[0]}


class Resnet50:
    inputs = [t("input", "FP32", [-1, 3, 224, 224])]
    outputs = [t("logits", "FP32", [-1, 1000])]
    batchable = True

    def __init__(self, models):
        self.s = session(os.path.join(models, "resnet50/model.onnx"), 2)

    def __call__(self, x):
        return {"logits": self.s.run(None, {"input": x["input"]})[0]}


class Classify:
    inputs = [t("image", "BYTES", [-1, 1])]
    outputs = [t("scores", "FP32", [-1, 5]), t("classes", "INT64", [-1, 5])]
    batchable = True

    def __init__(self, models):
        self.s = session(os.path.join(models, "resnet50/model.onnx"), 2)

    def __call__(self, x):
        batch = np.stack([classify_input(decode(b)) for b in x["image"].reshape(-1)])
        scores, classes = softmax_top5(self.s.run(None, {"input": batch})[0])
        return {"scores": scores, "classes": classes}


class Detect:
    """One image per request (the boxes of several would need padding to batch)."""
    inputs = [t("image", "BYTES", [-1, 1])]
    outputs = [t("boxes", "FP32", [-1, -1, 4])]
    batchable = False

    def __init__(self, models):
        self.s = session(os.path.join(models, "detector/model.onnx"), 2)

    def detect(self, blob):
        img = decode(blob)
        x, scale, left, top = letterbox(img)
        pred = self.s.run(None, {"images": x[None]})[0][0]
        return img, detections(pred, img, scale, left, top)

    def __call__(self, x):
        _, (boxes, _, _) = self.detect(x["image"].reshape(-1)[0])
        return {"boxes": boxes[None]}


class DetectCropClassify(Detect):
    outputs = [t("boxes", "FP32", [-1, -1, 4]), t("box_scores", "FP32", [-1, -1]),
               t("box_classes", "INT64", [-1, -1]), t("crop_scores", "FP32", [-1, -1, 5]),
               t("crop_classes", "INT64", [-1, -1, 5]), t("count", "INT64", [-1, 1])]

    def __init__(self, models):
        super().__init__(models)
        self.classifier = session(os.path.join(models, "resnet50/model.onnx"), 2)

    def __call__(self, x):
        img, (boxes, box_scores, box_classes) = self.detect(x["image"].reshape(-1)[0])
        n = len(boxes)
        scores, classes = np.zeros((0, 5), np.float32), np.zeros((0, 5), np.int64)
        if n:
            crops = []
            for x1, y1, x2, y2 in boxes:
                c = img.crop((int(x1), int(y1), max(int(x1) + 1, int(np.ceil(x2))), max(int(y1) + 1, int(np.ceil(y2)))))
                c = np.asarray(c.resize((224, 224), Image.BILINEAR), np.float32) / 255
                crops.append(((c - MEAN) / STD).transpose(2, 0, 1))
            scores, classes = softmax_top5(self.classifier.run(None, {"input": np.stack(crops)})[0])
        return {"boxes": boxes[None], "box_scores": box_scores[None], "box_classes": box_classes[None],
                "crop_scores": scores[None], "crop_classes": classes[None], "count": np.array([[n]], np.int64)}


WORKLOADS = {"tiny": Tiny, "resnet50": Resnet50, "classify": Classify, "detect": Detect,
             "detect_crop_classify": DetectCropClassify}
