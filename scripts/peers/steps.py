"""The benchmark workloads as the Python servers' users would write them: the same ONNX
files, ONNX Runtime sessions with the same options as sluice's (intra-op threads from its
model.yaml, spinning off), and the pipelines' steps in OpenCV and NumPy inside predict.
OpenCV because its kernels are the ones sluice's ops match (bilinear without antialiasing,
as `cv2.resize(INTER_LINEAR)`; Pillow's BILINEAR smooths when shrinking, which is more
work). Shared by the MLServer runtime and the KServe model of scripts/bench_peers.py (each
imports it from its own venv).

A workload maps input arrays (batch first, as the V2 protocol carries them) to output
arrays. Its `inputs`/`outputs` are the V2 metadata perf_analyzer reads: the same names,
datatypes and shapes as sluice serves, so perf_analyzer sends every server the same bytes.
"""
import os

import cv2
import numpy as np
import onnxruntime as ort

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# OpenCV's own thread pool would compete with ONNX Runtime's threads, as sluice's CPU
# pools are sized not to.
cv2.setNumThreads(1)


def session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # sluice turns spinning off (its CPU pools need the cores); the same here.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def decode(blob, flags=cv2.IMREAD_COLOR):
    img = cv2.imdecode(np.frombuffer(bytes(blob), np.uint8), flags)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def jpeg_size(blob):
    """(width, height) from a JPEG's frame header, without decoding; None if not found."""
    b = bytes(blob)
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(b) and b[i] == 0xFF:
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a SOFn
            return int.from_bytes(b[i + 7:i + 9], "big"), int.from_bytes(b[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(b[i + 2:i + 4], "big")
    return None


REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_reduced(blob, max_side):
    """libjpeg's DCT-scaled decode, as a user who knows the model's input size writes it:
    the smallest of 1/2, 1/4, 1/8 whose longer side is still >= max_side (sluice's
    `max_side` rule). Returns the image, the photo's pixels per image pixel, and the
    photo's (height, width)."""
    size = jpeg_size(blob)
    f = next((f for f in (8, 4, 2) if size and -(-max(size) // f) >= max_side), 1)
    img = decode(blob, REDUCED[f] if f > 1 else cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    if not size:
        return img, 1.0, (h, w)
    pw, ph = size
    if (h > w) != (ph > pw):  # cv2 applied an EXIF rotation; the header's size is before it
        pw, ph = ph, pw
    # libjpeg rounds a reduced side up: the ratio of the sides, not f itself.
    return img, pw / w, (ph, pw)


def softmax_top5(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1)[:, :5]
    return np.take_along_axis(p, idx, axis=1).astype(np.float32), idx.astype(np.int64)


def to_chw(img):
    return ((img.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)


def classify_input(img):
    """torchvision's eval transform: shorter side to 256, centre crop 224, normalize, CHW."""
    h, w = img.shape[:2]
    s = 256 / min(w, h)
    rw, rh = max(224, round(w * s)), max(224, round(h * s))
    img = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_LINEAR)
    left, top = (rw - 224) // 2, (rh - 224) // 2
    return to_chw(img[top:top + 224, left:left + 224])


def letterbox(img, size=320, pad=114):
    h, w = img.shape[:2]
    scale = min(size / w, size / h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas = np.full((size, size, 3), pad, np.uint8)
    canvas[top:top + nh, left:left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return canvas.astype(np.float32).transpose(2, 0, 1) / 255, scale, left, top


def nms(boxes, scores, classes, iou_threshold=0.45, max_detections=8):
    """Greedy class-wise NMS, best first, vectorised over the remaining boxes."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size and len(keep) < max_detections:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[(iou <= iou_threshold) | (classes[rest] != classes[i])]
    return np.array(keep, np.int64)


def detections(pred, size, scale, left, top, score_threshold=0.25):
    """YOLOv5 rows (cx, cy, w, h, objectness, class scores) -> boxes in the pixels of a
    photo of size (height, width), letterboxed at `scale`."""
    cls = pred[:, 5:].argmax(axis=1)
    score = pred[:, 4] * pred[np.arange(len(pred)), 5 + cls]
    m = score >= score_threshold
    p, score, cls = pred[m], score[m], cls[m]
    h, w = size
    x1 = np.clip((p[:, 0] - p[:, 2] / 2 - left) / scale, 0, w)
    y1 = np.clip((p[:, 1] - p[:, 3] / 2 - top) / scale, 0, h)
    x2 = np.clip((p[:, 0] + p[:, 2] / 2 - left) / scale, 0, w)
    y2 = np.clip((p[:, 1] + p[:, 3] / 2 - top) / scale, 0, h)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    keep = nms(boxes, score, cls)
    return boxes[keep].reshape(-1, 4), score[keep].astype(np.float32), cls[keep].astype(np.int64)


def t(name, datatype, shape):
    return {"name": name, "datatype": datatype, "shape": shape}


class TensorModel:
    """A model served alone: the request's one tensor straight into its session."""

    def __init__(self, models):
        self.s = session(os.path.join(models, self.model, "model.onnx"), self.threads)

    def __call__(self, x):
        name = self.inputs[0]["name"]
        return {self.outputs[0]["name"]: self.s.run(None, {name: x[name]})[0]}


class Tiny(TensorModel):
    model, threads = "tiny", 1
    inputs = [t("x", "FP32", [-1, 4])]
    outputs = [t("y", "FP32", [-1, 4])]


class Resnet50(TensorModel):
    model, threads = "resnet50", 2
    inputs = [t("input", "FP32", [-1, 3, 224, 224])]
    outputs = [t("logits", "FP32", [-1, 1000])]


class Classify:
    inputs = [t("image", "BYTES", [-1, 1])]
    outputs = [t("scores", "FP32", [-1, 5]), t("classes", "INT64", [-1, 5])]

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

    def __init__(self, models):
        self.s = session(os.path.join(models, "detector/model.onnx"), 2)
        # PEER_DECODE_MAX_SIDE: decode JPEGs reduced (decode_reduced), as sluice's
        # `max_side` does; boxes stay in the photo's pixels.
        self.max_side = int(os.environ.get("PEER_DECODE_MAX_SIDE", "0"))

    def detect(self, blob):
        if self.max_side:
            img, ratio, size = decode_reduced(blob, self.max_side)
        else:
            img = decode(blob)
            ratio, size = 1.0, img.shape[:2]
        x, scale, left, top = letterbox(img)
        pred = self.s.run(None, {"images": x[None]})[0][0]
        return img, detections(pred, size, scale / ratio, left, top)

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
            h, w = img.shape[:2]
            for x1, y1, x2, y2 in boxes:
                x1, y1 = min(int(x1), w - 1), min(int(y1), h - 1)
                crop = img[y1:max(y1 + 1, int(np.ceil(y2))), x1:max(x1 + 1, int(np.ceil(x2)))]
                crops.append(to_chw(cv2.resize(crop, (224, 224), interpolation=cv2.INTER_LINEAR)))
            scores, classes = softmax_top5(self.classifier.run(None, {"input": np.stack(crops)})[0])
        return {"boxes": boxes[None], "box_scores": box_scores[None], "box_classes": box_classes[None],
                "crop_scores": scores[None], "crop_classes": classes[None], "count": np.array([[n]], np.int64)}


WORKLOADS = {"tiny": Tiny, "resnet50": Resnet50, "classify": Classify, "detect": Detect,
             "detect_crop_classify": DetectCropClassify}
