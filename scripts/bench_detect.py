"""What the pipeline benchmarks share: the `detect` pipeline they serve (JPEG decode ->
letterbox to 320x320 -> the example YOLO-shaped detector -> NMS; bench_pipeline.py,
bench_reload.py, bench_peers.py) and the photo-like JPEG they send."""
import io

import numpy as np
from PIL import Image



def detect_pipeline(max_detections=8, decode_params=""):
    """The pipeline's YAML; decode_params adds decode_image's params (e.g. the reduced
    decode, "engine: opencv, max_side: 320")."""
    decode = f", params: {{{decode_params}}}" if decode_params else ""
    return f"""max_batch_size: 8
inputs:
  - {{name: image, dtype: BYTES, dims: [1]}}
outputs:
  - {{name: boxes, from: nms.boxes}}
nodes:
  - {{name: decode, op: decode_image, inputs: {{bytes: image}}{decode}}}
  - name: letterbox
    op: resize
    inputs: {{image: decode.image}}
    params: {{mode: letterbox, width: 320, height: 320, pad: 114}}
  - {{name: to_input, op: normalize, inputs: {{image: letterbox.image}}, params: {{scale: 0.00392156862745098}}}}
  - {{name: detector, model: detector, inputs: {{images: to_input.tensor}}}}
  - name: nms
    op: detect_yolo
    inputs: {{predictions: detector.predictions, image: decode.image}}
    params: {{width: 320, height: 320, max_detections: {max_detections}}}
"""


def photo(w, h):
    """A JPEG with photo-like content (smooth shading, edges, noise), quality 90."""
    rng = np.random.default_rng(w)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    for _ in range(12):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(h // 20, h // 4)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()
