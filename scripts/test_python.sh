#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Python package check: a venv (build/pyvenv, or $DMOE_PY_VENV) with what is missing installed by
# pip (nanobind, scikit-build-core, numpy, pytest, torch), `pip install .`, then pytest tests/python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${DMOE_PY_VENV:-build/pyvenv}"
py="${PYTHON:-python3}"
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
venv="$(cd "$venv" && pwd)"
pip=("$venv/bin/python" -m pip)
"$venv/bin/python" -c "import nanobind, scikit_build_core, numpy, pytest" 2>/dev/null ||
  "${pip[@]}" install -q "nanobind>=2.4" "scikit-build-core>=0.10" numpy pytest
"$venv/bin/python" -c "import torch; torch.ones(2) @ torch.ones(2)" 2>/dev/null ||
  "${pip[@]}" install -q torch
"${pip[@]}" install -q --no-build-isolation .
set +e
(cd tests/python && "$venv/bin/python" -m pytest -q .)
rc=$?
set -e
if [[ $rc == 5 ]]; then echo "test_python.sh: pytest collected no tests" >&2; exit 1; fi
exit $rc
