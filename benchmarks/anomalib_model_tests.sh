#!/usr/bin/env bash
# Run anomalib's own model integration tests (fit, test, train, validate, predict, export to
# torch / ONNX / OpenVINO on its dummy MVTec dataset) with OCBank as the model under test.
#
#   benchmarks/anomalib_model_tests.sh [ANOMALIB_GIT_REF] [SCRATCH_DIR]
#
# anomalib's test code is fetched into SCRATCH_DIR (default: a temporary folder), never into
# this repository; benchmarks/anomalib_tests_plugin.py adds OCBank to their model list.
# Needs the anomalib extra (and openvino for the OpenVINO export).
set -euo pipefail
REF="${1:-lib/v2.7.0}"
SCRATCH="${2:-$(mktemp -d)}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"

if [ ! -d "$SCRATCH/src/.git" ]; then
  git clone --quiet --depth 1 --branch "$REF" https://github.com/open-edge-platform/anomalib "$SCRATCH/src"
fi
mkdir -p "$SCRATCH/run/tests/integration"
cp -r "$SCRATCH/src/tests/__init__.py" "$SCRATCH/src/tests/conftest.py" "$SCRATCH/src/tests/helpers" "$SCRATCH/run/tests/"
cp -r "$SCRATCH/src/tests/integration/__init__.py" "$SCRATCH/src/tests/integration/model" "$SCRATCH/run/tests/integration/"

cd "$SCRATCH/run"
# -p loads the plugin before test_models.py imports list_models/get_model; the order of the
# tests matters (test_fit writes the checkpoint the others load), so no random ordering.
PYTHONPATH="$REPO:$SCRATCH/run" HF_HUB_OFFLINE=1 "$PY" -m pytest -p benchmarks.anomalib_tests_plugin \
  tests/integration/model/test_models.py -v -rA -p no:cacheprovider "${@:3}"
