"""Loads the seed document's Python classes at run time, for the baseline measurements.

The project never holds a copy of the seed's code. This loader reads the shared document
(`--seed-doc`, default `../shared/seed/000_e53ab93c4a8e6ba3.txt` relative to the repository
root), takes every ```python block in order and execs them in one fresh module, so the
baseline runs the very classes the document describes.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED_NAME = "000_e53ab93c4a8e6ba3.txt"
DEFAULT_SEED_DOC = REPO_ROOT.parent / "shared" / "seed" / SEED_NAME
MODULE_NAME = "loadtest_seed_document"
# A fence opening with exactly ```python at the start of a line, up to the next closing fence.
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


class SeedError(RuntimeError):
    """The seed document is missing or holds no Python."""


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed-doc",
        type=Path,
        default=DEFAULT_SEED_DOC,
        help=f"the seed document whose ```python blocks are loaded (default {DEFAULT_SEED_DOC})",
    )


def python_blocks(text: str) -> list[str]:
    return PYTHON_BLOCK.findall(text)


def load_seed(path: Path | None = None) -> types.SimpleNamespace:
    """Exec every ```python block of the document, in order, in one module namespace.

    The blocks run as a registered module so dataclasses and enums resolve their module as
    they would when imported. The seed calls redis-py APIs deprecated since it was written
    (`setex`); those warnings are silenced, the code runs exactly as written.
    """
    document = Path(path) if path is not None else DEFAULT_SEED_DOC
    if not document.is_file():
        raise SeedError(f"seed document not found at {document} (pass --seed-doc PATH)")
    blocks = python_blocks(document.read_text(encoding="utf-8"))
    if not blocks:
        raise SeedError(f"seed document {document} holds no ```python blocks")
    warnings.filterwarnings("ignore", message="Call to deprecated", category=DeprecationWarning)
    module = types.ModuleType(MODULE_NAME, f"Python blocks of {document}")
    module.__file__ = str(document)
    sys.modules[MODULE_NAME] = module
    for index, block in enumerate(blocks):
        exec(compile(block, f"{document}#python-block-{index}", "exec"), module.__dict__)
    public = {name: value for name, value in vars(module).items() if not name.startswith("__")}
    return types.SimpleNamespace(**public)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Load the document and list the classes it defines (a quick check that it loads)."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.seedload", description="load the seed document's classes"
    )
    add_seed_argument(parser)
    args = parser.parse_args(argv)
    seed = load_seed(args.seed_doc)
    classes = sorted(name for name, value in vars(seed).items() if isinstance(value, type))
    result: dict[str, object] = {"seed_doc": str(args.seed_doc), "classes": classes}
    print(result)
    return result


if __name__ == "__main__":
    main()
