#!/usr/bin/env bash
# Install everything vlmlens needs on a fresh Debian machine with Python 3.10+.
#   bash scripts/install.sh          runtime (app + library)
#   bash scripts/install.sh --dev    also test tools and Chromium for the browser test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # Debian's chromium for the end-to-end dashboard test (never `playwright install`).
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will fail" >&2
fi
# torch first, pinned to the CPU wheel; an unpinned torch would pull GBs of CUDA packages.
# (With a CUDA machine, install your CUDA torch build first: requirements.txt accepts any torch>=2.4.)
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q --disable-pip-version-check torch==2.13.0
$PY -m pip install -q --disable-pip-version-check -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  $PY -m pip install -q --disable-pip-version-check -r requirements-dev.txt
fi
# the package itself, editable: `import vlmlens` works from any folder (its dependencies are above)
$PY -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
