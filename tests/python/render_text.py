"""Renders the OCR test images: known text in several fonts and sizes, Latin and Chinese,
a line turned upside down, several lines in one image, and a blank page. Writes PNGs and
cases.json ([{"file", "lines": [text in reading order]}]) into OUT_DIR.

With --random N, writes N more pages of random words and numbers in random fonts, sizes
and places (seeded), for the parity check and the benchmark.

usage: render_text.py OUT_DIR [--random N]
"""
import random
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
DEJAVU = "/usr/share/fonts/truetype/dejavu/"
SANS, SERIF, MONO = DEJAVU + "DejaVuSans.ttf", DEJAVU + "DejaVuSerif.ttf", DEJAVU + "DejaVuSansMono.ttf"
BOLD = DEJAVU + "DejaVuSans-Bold.ttf"
CJK = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"


def page(lines, size=(800, 300), rotate=False):
    """lines: [(text, font file, px, (x, y))]"""
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    for text, font, px, xy in lines:
        d.text(xy, text, fill=(20, 20, 20), font=ImageFont.truetype(font, px))
    return img.rotate(180) if rotate else img


cases = [
    ("sans", page([("Hello sluice 2026", SANS, 44, (40, 120))]), ["Hello sluice 2026"]),
    ("serif", page([("The quick brown fox", SERIF, 36, (60, 110))]), ["The quick brown fox"]),
    ("mono", page([("INVOICE 12345", MONO, 30, (80, 130))]), ["INVOICE 12345"]),
    ("bold_small", page([("Inference server", BOLD, 24, (30, 140))], size=(500, 200)), ["Inference server"]),
    ("chinese", page([("你好世界", CJK, 48, (60, 110))]), ["你好世界"]),
    ("chinese_long", page([("深度学习推理服务", CJK, 40, (40, 120))]), ["深度学习推理服务"]),
    ("upside_down", page([("Upside down line", SANS, 40, (80, 120))], rotate=True), ["Upside down line"]),
    (
        "three_lines",
        page([("First line here", SANS, 36, (40, 30)), ("Second line", SERIF, 32, (40, 120)),
              ("Third 3", MONO, 34, (40, 210))], size=(700, 300)),
        ["First line here", "Second line", "Third 3"],
    ),
    ("two_columns", page([("Left side", SANS, 34, (30, 120)), ("Right side", SANS, 34, (450, 122))]),
     ["Left side", "Right side"]),
    ("blank", page([]), []),
]
meta = []
for name, img, lines in cases:
    img.save(out / f"{name}.png")
    meta.append({"file": f"{name}.png", "lines": lines})
if "--random" in sys.argv:
    rng = random.Random(7)
    words = ("sluice server model batch image text line queue worker latency 2026 GPU CPU "
             "pipeline tensor decode crop 42 3.14 ONNX Runtime 推理 模型 服务 文本 识别 图像").split()
    for k in range(int(sys.argv[sys.argv.index("--random") + 1])):
        lines, y = [], rng.randint(10, 40)
        for _ in range(rng.randint(1, 5)):
            px = rng.randint(22, 44)
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
            font = CJK if any(ord(ch) > 127 for ch in text) else rng.choice([SANS, SERIF, MONO, BOLD])
            lines.append((text, font, px, (rng.randint(10, 120), y)))
            y += px + rng.randint(20, 50)
        name = f"random_{k:03d}"
        page(lines, size=(900, max(y + 20, 200))).save(out / f"{name}.png")
        meta.append({"file": f"{name}.png", "lines": [t for t, _, _, _ in lines], "random": True})
(out / "cases.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))
print(f"wrote {len(meta)} images to {out}")
