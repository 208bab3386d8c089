#!/usr/bin/env bash
# Installs what sluice needs at run time and in its tests, all from PyPI and Debian (no
# model hub): ONNX Runtime's shared library, the PaddleOCR det/cls/rec models shipped in
# rapidocr-onnxruntime, a ResNet-50 generated with seeded random weights, and Triton's
# Python client plus perf_analyzer for the compatibility tests and benchmarks, and
# Chromium with selenium for the dashboard's browser test.
# Idempotent: a second run only checks that everything is in place.
#   SLUICE_SKIP_RESNET=1   skip generating models/resnet50/model.onnx (only the deploy test,
#                          which serves the example repository in containers, needs it)
#   SLUICE_GPU=auto|1|0    the GPU runtime (below): auto installs it when nvidia-smi sees a GPU
#   SLUICE_SKIP_DEPLOY=1   skip .venv-deploy (Helm's Go SDK and the schemas that
#                          scripts/render_manifests.py renders and validates deploy/ with)
#   SLUICE_OPENCV=1        also Debian's OpenCV development packages and libclang, for
#                          the `opencv` cargo feature and the OpenCV engine's crate
#                          (ops-opencv), which any `--workspace` build compiles (the
#                          test command sets it)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
REQS=(
  onnxruntime==1.31.1
  onnx==1.23.2
  numpy==2.4.6
  rapidocr-onnxruntime==1.4.4
  "tritonclient[grpc,http]==2.41.0"
  nvidia-cuda-runtime-cu12==12.9.79
  pytest==9.2.0
  selenium==4.50.0
)
# venv_install DIR WHAT REQ...: makes the venv and installs REQ into it, unless a stamp
# of exactly these requirements is there. (Not run in $(...): errexit does not reach there.)
venv_install() {
  local dir=$1 what=$2
  shift 2
  local stamp
  stamp="$dir/.sluice-setup-$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
    echo "setup: installing $what into $dir"
    "$dir/bin/python" -m pip install --disable-pip-version-check -q "$@"
    touch "$stamp"
  fi
}
site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
venv_install "$VENV" "Python packages" "${REQS[@]}"
SITE=$(site_of "$VENV")

# ONNX Runtime: the wheel ships only the versioned library name.
mkdir -p .sluice/lib .sluice/bin
ort_lib=$(ls "$SITE"/onnxruntime/capi/libonnxruntime.so.* | head -n 1)
[ "$(readlink .sluice/lib/libonnxruntime.so)" = "$ort_lib" ] || ln -sfn "$ort_lib" .sluice/lib/libonnxruntime.so

# GPU hosts: ONNX Runtime's GPU build (libonnxruntime with its CUDA and TensorRT provider
# libraries) and the CUDA 13 and cuDNN 9 runtime from PyPI wheels, in a venv of its own
# (the CPU and GPU onnxruntime wheels cannot share one), linked as .sluice/lib-gpu/. sluice
# loads the CUDA libraries named in .sluice/lib-gpu/sluice-preload-dirs itself before ONNX
# Runtime, so no LD_LIBRARY_PATH is needed; the driver (libcuda.so.1) comes from the host.
# TensorRT's wheels are fetched from NVIDIA's index (pypi.nvidia.com): where it cannot be
# reached the TensorRT provider is reported unavailable and `execution_providers` falls
# through to the next one.
gpu=${SLUICE_GPU:-auto}
case "$gpu" in auto | 0 | 1) ;; *) echo "setup: SLUICE_GPU must be auto, 1 or 0 (got '$gpu')" >&2; exit 1 ;; esac
if [ "$gpu" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi
if [ "$gpu" = 1 ]; then
  GVENV=.venv-gpu
  TRT_REQ="tensorrt-cu13-libs==10.16.1.11"
  venv_install "$GVENV" "the GPU runtime (onnxruntime-gpu, CUDA, cuDNN)" "onnxruntime-gpu[cuda,cudnn]==1.31.1"
  GSITE=$(site_of "$GVENV")
  # TensorRT is tried on every run until it installs (its own stamp).
  tstamp="$GVENV/.sluice-trt-$(printf '%s' "$TRT_REQ" | sha256sum | cut -c1-16)"
  if [ ! -f "$tstamp" ]; then
    if "$GVENV/bin/python" -m pip install --disable-pip-version-check -q "$TRT_REQ" >"$GVENV/trt-install.log" 2>&1; then
      touch "$tstamp"
    else
      echo "setup: WARNING: no TensorRT ($TRT_REQ needs pypi.nvidia.com, see $GVENV/trt-install.log): the tensorrt provider will be unavailable" >&2
    fi
  fi
  mkdir -p .sluice/lib-gpu
  for f in "$GSITE"/onnxruntime/capi/libonnxruntime*.so*; do ln -sfn "$f" ".sluice/lib-gpu/$(basename "$f")"; done
  ln -sfn "$(basename "$(ls "$GSITE"/onnxruntime/capi/libonnxruntime.so.* | head -n 1)")" .sluice/lib-gpu/libonnxruntime.so
  # Every folder of the CUDA, cuDNN and TensorRT wheels that holds libraries.
  libdirs=()
  for d in "$GSITE/nvidia" "$GSITE/tensorrt_libs"; do [ -d "$d" ] && libdirs+=("$d"); done
  find "${libdirs[@]}" -name 'lib*.so*' -printf '%h\n' | sort -u > .sluice/lib-gpu/sluice-preload-dirs
  echo "setup: GPU runtime   .sluice/lib-gpu/libonnxruntime.so (serve with --ort-dylib .sluice/lib-gpu/libonnxruntime.so)"
fi

# deploy/: Helm v4's Go SDK (no helm binary), Kubernetes' JSON schemas and
# prometheus-operator's types, in a venv of their own (~0.6 GB) for
# scripts/render_manifests.py. The kserve SDK is installed without its
# dependencies: the script only reads its generated model classes.
if [ "${SLUICE_SKIP_DEPLOY:-0}" != 1 ]; then
  venv_install .venv-deploy "the deploy checks (helm-python-sdk, kubernetes-validate)" \
    helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.4 \
    cloudcoil==0.6.0 cloudcoil-models-prometheus-operator==0.80.1.0
  venv_install .venv-deploy "the kserve SDK's model classes" --no-deps kserve==0.21.0
fi

# Debian packages: perf_analyzer (inside the tritonclient 2.41.0 wheel) links libb64, even
# on hosts without a GPU (its libcudart comes from nvidia-cuda-runtime-cu12, see wrapper);
# the OCR tests render text with DejaVu (Latin) and WenQuanYi Micro Hei (Chinese); the
# dashboard test drives Debian's Chromium headless through its chromedriver; the test of
# `sluice bench --live` drives it in tmux.
debs=()
[ -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] || debs+=(libb64-0d)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || debs+=(fonts-dejavu-core)
[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || debs+=(fonts-wqy-microhei)
[ -x /usr/bin/chromium ] || debs+=(chromium)
[ -x /usr/bin/chromedriver ] || debs+=(chromium-driver)
command -v tmux >/dev/null || debs+=(tmux)
# SLUICE_OPENCV=1 (the test command sets it): what the OpenCV engine's crate builds
# against: OpenCV's core, imgproc and imgcodecs headers and libraries (not all of
# libopencv-dev, which pulls in every module) and libclang, with which the opencv crate
# generates its bindings.
if [ "${SLUICE_OPENCV:-0}" = 1 ]; then
  [ -e /usr/include/opencv4/opencv2/imgcodecs.hpp ] || debs+=(libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev)
  command -v clang >/dev/null || debs+=(clang)
  compgen -G "/usr/lib/llvm-*/lib/libclang.so" >/dev/null || debs+=(libclang-dev)
fi
if [ ${#debs[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then command -v sudo >/dev/null && sudo=sudo || sudo=none; fi
  if [ "$sudo" = none ]; then
    echo "setup: WARNING: ${debs[*]} missing and we are not root (no sudo): perf_analyzer, the OCR or the dashboard tests, or a build with the opencv feature, will fail" >&2
  else
    echo "setup: installing Debian's ${debs[*]}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}" >/dev/null
  fi
fi
pa=$(ls "$VENV"/bin/perf_analyzer "$SITE"/tritonclient/bin/perf_analyzer 2>/dev/null | head -n 1 || true)
[ -n "$pa" ] || { echo "setup: perf_analyzer not found in the tritonclient wheel" >&2; exit 1; }
# Written to a temporary file and renamed, so a running test never sees it half-written.
cat > .sluice/bin/perf_analyzer.tmp <<EOF
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$SITE/nvidia/cuda_runtime/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$(realpath "$pa")" "\$@"
EOF
chmod +x .sluice/bin/perf_analyzer.tmp
mv .sluice/bin/perf_analyzer.tmp .sluice/bin/perf_analyzer
# It exits 99 on --help (unknown option) but prints usage once its libraries load.
pa_help=$(.sluice/bin/perf_analyzer --help 2>&1 || true)
if ! grep -q '^Usage:' <<<"$pa_help"; then
  echo "setup: WARNING: .sluice/bin/perf_analyzer does not start; see: ldd $(realpath "$pa")" >&2
fi

# The real PaddleOCR models, as rapidocr ships them.
for pair in ocr_det:ch_PP-OCRv4_det_infer ocr_cls:ch_ppocr_mobile_v2.0_cls_infer ocr_rec:ch_PP-OCRv4_rec_infer; do
  dir=models/${pair%%:*}
  src="$SITE/rapidocr_onnxruntime/models/${pair#*:}.onnx"
  mkdir -p "$dir"
  cmp -s "$src" "$dir/model.onnx" || cp "$src" "$dir/model.onnx"
done

# The detect_crop_classify example's detector: YOLO-shaped, random weights, 2 MB.
if [ ! -f models/detector/model.onnx ]; then
  echo "setup: generating models/detector/model.onnx (random weights)"
  mkdir -p models/detector
  "$VENV/bin/python" scripts/gen_detector.py models/detector/model.onnx.tmp
  mv models/detector/model.onnx.tmp models/detector/model.onnx
fi

# The detect_route_classify example's light classifier: ResNet-50's interface, 0.1 MB.
if [ ! -f models/classifier_small/model.onnx ]; then
  echo "setup: generating models/classifier_small/model.onnx (random weights)"
  mkdir -p models/classifier_small
  "$VENV/bin/python" scripts/gen_small_classifier.py models/classifier_small/model.onnx.tmp
  mv models/classifier_small/model.onnx.tmp models/classifier_small/model.onnx
fi

if [ "${SLUICE_SKIP_RESNET:-0}" != 1 ] && [ ! -f models/resnet50/model.onnx ]; then
  echo "setup: generating models/resnet50/model.onnx (random weights, ~100 MB)"
  mkdir -p models/resnet50
  "$VENV/bin/python" scripts/gen_resnet50.py models/resnet50/model.onnx.tmp
  mv models/resnet50/model.onnx.tmp models/resnet50/model.onnx
fi

echo "setup: ONNX Runtime  .sluice/lib/libonnxruntime.so -> $ort_lib"
echo "setup: perf_analyzer .sluice/bin/perf_analyzer"
for m in models/*/model.onnx; do
  if [ -f "$m" ]; then echo "setup: model         $m"; fi
done
echo "setup: export ORT_DYLIB_PATH=$PWD/.sluice/lib/libonnxruntime.so"
