"""The README's Python example runs as written, on the tiny trained bundle."""

import torch
from PIL import Image

from .conftest import REPO

MARKER = "<!-- python-example -->"


def readme_example() -> str:
    """The ```python block on the lines right after the marker line in README.md."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert MARKER in lines, f"README.md has no {MARKER} line"
    start = lines.index(MARKER) + 1
    assert lines[start] == "```python", f"no ```python block right after {MARKER}"
    end = lines.index("```", start + 1)
    return "\n".join(lines[start + 1 : end]) + "\n"


def test_readme_python_example_writes_the_grid(trained, tmp_path):
    code = readme_example()
    out = tmp_path / "grid.png"
    for old, new in (("demo/runs/shapes-transformer/export", trained["bundle"]), ("grid.png", out)):
        assert f'"{old}"' in code, old
        code = code.replace(f'"{old}"', repr(str(new)))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    images = namespace["images"]
    assert images.shape == (8, 3, 32, 32) and images.min() >= -1 and images.max() <= 1 and torch.isfinite(images).all()
    # 4 columns x 2 rows of 128-px cells, each under a two-line label (11 px a line, 4 px margin)
    assert Image.open(out).size == (4 * 128, 2 * (128 + 2 * 11 + 4))
