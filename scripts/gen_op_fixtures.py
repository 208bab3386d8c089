"""Writes the reference fixtures that ops/tests/references.rs checks the ops against.

The references come from the libraries vision models are trained with: OpenCV for
resizing (INTER_LINEAR), Pillow (libjpeg) for JPEG decoding and EXIF orientation, numpy
for normalisation. Run from the repository root with the set-up step's venv:

    .venv/bin/python scripts/gen_op_fixtures.py ops/tests/fixtures
"""
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
