"""The README's usage example runs as written (on the built-in demo dataset)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"<!-- example -->\n```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no <!-- example --> python block"
    monkeypatch.setenv("DYNACLR_DALI_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "torch.Size([16, 2, 2, 32, 32])" in out and (tmp_path / "demo_index.npz").exists()
