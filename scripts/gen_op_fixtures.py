"""Writes the reference fixtures that ops/tests/references.rs checks the ops against.

The references come from the libraries vision models are trained with: OpenCV for
resizing (INTER_LINEAR; INTER_AREA, INTER_CUBIC and DCT-scaled JPEG decodes for the
`opencv` engine), Pillow (libjpeg) for JPEG decoding and EXIF orientation, numpy
for normalisation. Run from the repository root with the set-up step's venv:

    .venv/bin/python scripts/gen_op_fixtures.py ops/tests/fixtures
"""
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(3)

# A smooth image with some texture: random noise would make every resize a coin toss.
h, w = 23, 37
yy, xx = np.mgrid[0:h, 0:w]
src = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * yy) % 256], axis=-1).astype(np.int32)
src = np.clip(src + rng.integers(-20, 21, src.shape), 0, 255).astype(np.uint8)
Image.fromarray(src).save(out / "src.png")

for name, size in [("resize_up", (53, 31)), ("resize_down", (17, 11))]:
    r = cv2.resize(src, size, interpolation=cv2.INTER_LINEAR)  # src is RGB; cv2 does not care
    (out / f"{name}.rgb").write_bytes(r.tobytes())

mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
norm = ((src / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)
(out / "normalize_nchw.f32").write_bytes(norm.tobytes())

# JPEG without chroma subsampling, so decoders differ only in IDCT rounding.
photo = cv2.resize(src, (64, 48), interpolation=cv2.INTER_LINEAR)
Image.fromarray(photo).save(out / "photo.jpg", quality=92, subsampling=0)
(out / "photo.rgb").write_bytes(np.asarray(Image.open(out / "photo.jpg").convert("RGB")).tobytes())

exif = Image.Exif()
exif[0x0112] = 6  # stored rotated: turn 90 degrees clockwise to view
Image.fromarray(photo).save(out / "photo_orient6.jpg", quality=92, subsampling=0, exif=exif)
upright = ImageOps.exif_transpose(Image.open(out / "photo_orient6.jpg")).convert("RGB")
(out / "photo_orient6.rgb").write_bytes(np.asarray(upright).tobytes())
print("upright size", upright.size)

# A rotated quadrilateral warped upright, as PaddleOCR crops text boxes.
quad = np.float32([[5, 3], [30, 6], [28, 19], [4, 15]])
qw = int(round(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[3] - quad[2]))))
qh = int(round(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2]))))
m = cv2.getPerspectiveTransform(quad, np.float32([[0, 0], [qw, 0], [qw, qh], [0, qh]]))
warped = cv2.warpPerspective(src, m, (qw, qh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
(out / "quad.rgb").write_bytes(warped.tobytes())
(out / "quad.json").write_text(f'{{"quad": {quad.tolist()}, "width": {qw}, "height": {qh}}}')

# The OpenCV engine's other kernels (`engine: opencv`): INTER_AREA, INTER_CUBIC, and a
# JPEG decoded at half size by libjpeg's DCT scaling (IMREAD_REDUCED_COLOR_2), as RGB.
(out / "resize_down_area.rgb").write_bytes(cv2.resize(src, (17, 11), interpolation=cv2.INTER_AREA).tobytes())
cubic = cv2.warpPerspective(src, m, (qw, qh), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
(out / "quad_cubic.rgb").write_bytes(cubic.tobytes())
half = cv2.imdecode(np.frombuffer((out / "photo.jpg").read_bytes(), np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
(out / "photo_half.rgb").write_bytes(cv2.cvtColor(half, cv2.COLOR_BGR2RGB).tobytes())
print("half size", half.shape[1], "x", half.shape[0])

# Resize modes, each from OpenCV's INTER_LINEAR plus numpy slicing / padding.
def letterbox(img, dw, dh, pad):
    h, w = img.shape[:2]
    scale = min(dw / w, dh / h)
    nw, nh = min(max(round(w * scale), 1), dw), min(max(round(h * scale), 1), dh)
    left, top = (dw - nw) // 2, (dh - nh) // 2
    canvas = np.full((dh, dw, 3), pad, np.uint8)
    canvas[top:top + nh, left:left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return canvas


def shorter_side_crop(img, shorter, cw, ch):
    h, w = img.shape[:2]
    scale = shorter / min(w, h)
    rw, rh = max(round(w * scale), cw), max(round(h * scale), ch)
    r = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_LINEAR)
    left, top = (rw - cw) // 2, (rh - ch) // 2
    return r[top:top + ch, left:left + cw]


(out / "letterbox_32x32.rgb").write_bytes(letterbox(src, 32, 32, 114).tobytes())
(out / "shorter_crop_16.rgb").write_bytes(shorter_side_crop(src, 20, 16, 16).tobytes())
(out / "rotate180.rgb").write_bytes(np.rot90(src, 2).copy().tobytes())

# Scores for softmax / top-k, and detections for class-wise NMS (OpenCV's NMSBoxesBatched).
logits = rng.normal(0, 2, 50).astype(np.float32)
e = np.exp(logits - logits.max())
probs = e / e.sum()
top = np.argsort(-probs, kind="stable")[:5]
n = 60
xy = rng.uniform(0, 40, (n, 2))
wh = rng.uniform(8, 30, (n, 2))
boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
scores = rng.uniform(0.3, 1.0, n).astype(np.float32)
classes = rng.integers(0, 3, n)
xywh = [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes]
kept = cv2.dnn.NMSBoxesBatched(xywh, scores.tolist(), classes.tolist(), 0.0, 0.45)
kept = sorted(np.array(kept).reshape(-1).tolist(), key=lambda i: -scores[i])
(out / "tensors.json").write_text(json.dumps({
    "logits": logits.tolist(), "softmax": probs.tolist(), "top5": top.tolist(),
    "boxes": boxes.reshape(-1).tolist(), "scores": scores.tolist(), "classes": classes.tolist(), "nms_kept": kept,
}))
