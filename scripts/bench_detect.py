"""The `detect` pipeline the benchmarks serve: JPEG decode -> letterbox to 320x320 -> the
example YOLO-shaped detector -> NMS. Shared by bench_pipeline.py and bench_reload.py."""


def detect_pipeline(max_detections=8):
    return f"""max_batch_size: 8
inputs:
  - {{name: image, dtype: BYTES, dims: [1]}}
outputs:
  - {{name: boxes, from: nms.boxes}}
nodes:
  - {{name: decode, op: decode_image, inputs: {{bytes: image}}}}
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
