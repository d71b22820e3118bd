# SPDX-License-Identifier: MIT
"""The quick start in docs/python.md runs as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_start_runs():
    text = open(os.path.join(ROOT, "docs", "python.md")).read()
    code = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "docs/python.md", "exec"), {})
