#!/usr/bin/env bash
# Set up everything on a fresh machine, then run one job.
#   bash scripts/bootstrap.sh demo   # the main job: explain benchmark images with the default models,
#                                    # then one request through the gRPC server
#   bash scripts/bootstrap.sh test   # the test suite
#   bash scripts/bootstrap.sh env    # set up only
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"
shift || true

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# torch first: 2.13.0 is a CPU wheel on disk; anything else pulls a multi-GB CUDA build.
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
fi
if ! .venv/bin/python -c 'import fam_core, pytest, ruff' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.fam-installed ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
  touch .venv/.fam-installed
fi
if ! command -v java >/dev/null 2>&1; then
  echo "note: java not found; TorchServe needs Java 17 (the rest works without it)" >&2
fi
.venv/bin/python -m fam_core.protos  # gRPC stubs from proto/, regenerated when stale
# (each classifier starts from its embedding model, so the embedding models come first)
for name in default-embedding default-classifier default-embedding-fine default-classifier-fine; do
  if [ ! -f "model-store/$name/weights.pt" ]; then
    .venv/bin/fam train "$name"
  fi
done

case "$job" in
  demo) .venv/bin/fam demo "$@" && exec .venv/bin/fam serve-demo ;;
  test)
    # tests/ui/test_ui.py drives Debian's chromium (Playwright cannot download its own browsers)
    if ! command -v chromium >/dev/null 2>&1; then
      sudo=""
      if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
      $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
    fi
    bash scripts/build_onnx_zoo.sh  # the tests' tf2onnx-converted files (own venv, cached)
    exec .venv/bin/python -m pytest -q "$@" ;;
  env) ;;
  *) echo "usage: bash scripts/bootstrap.sh {demo|test|env} [ARGS...]" >&2; exit 2 ;;
esac
