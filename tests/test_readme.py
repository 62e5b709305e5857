"""Every ```python block of the README runs, in order, in one namespace: the docs cannot rot."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.S | re.M).group(1)
    assert first_block.split() == ["make", "demo", "make", "test"]


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5
    script = tmp_path / "readme_blocks.py"
    parts = []
    for i, b in enumerate(blocks):
        parts.append(f"# --- README block {i}\nprint('README block {i}', flush=True)\n{b}")
    script.write_text("\n".join(parts))
    env = dict(os.environ, NNXFIT_README="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"README block {len(blocks) - 1}" in r.stdout
