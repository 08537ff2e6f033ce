#!/usr/bin/env bash
# timm's own model tests on lkvision's models: tests/test_models.py from the sdist of the installed timm
# version, unchanged, with the model lists pointed at lkvision by timm_glue.py (see its docstring).
# Usage: bash tests/timm_contract/run.sh [pytest args]. TIMM_SDIST_DIR=<dir> reuses a downloaded sdist.
set -euo pipefail
cd "$(dirname "$0")/../.."
ver=$(python3 -c "import importlib.metadata as m; print(m.version('timm'))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sdist_dir=${TIMM_SDIST_DIR:-$work}
if [ ! -f "$sdist_dir/timm-$ver.tar.gz" ]; then
    python3 -m pip download -q --no-deps --no-binary :all: "timm==$ver" -d "$sdist_dir"
fi
tar -xzf "$sdist_dir/timm-$ver.tar.gz" -C "$work" "timm-$ver/tests/test_models.py"
PYTHONPATH="$PWD/tests/timm_contract${PYTHONPATH:+:$PYTHONPATH}" \
    python3 -m pytest -p timm_glue -p no:cacheprovider -q "$@" "$work/timm-$ver/tests/test_models.py"
