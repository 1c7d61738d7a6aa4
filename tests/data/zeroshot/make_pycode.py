"""Regenerate ``pycode.jsonl``: the local multiple-choice smoke task for ``prac eval --tasks``.

Each item is a few lines of the bundled held-out Python text (``src/prac/assets/pystdlib/eval.txt``)
ending in the first half of a line; the choices are how that line really goes on and how three other
sampled lines go on. Deterministic (seeded); run from the repository root::

    python tests/data/zeroshot/make_pycode.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
TEXT = ROOT / "src" / "prac" / "assets" / "pystdlib" / "eval.txt"
OUT = Path(__file__).resolve().parent / "pycode.jsonl"
N_ITEMS = 40
N_CHOICES = 4
CONTEXT_LINES = 4


def _split(line: str) -> int | None:
    """Where a line is cut: after its first ``(``, `` = `` or ``.``, if that leaves 6+ characters."""
    for mark in (" = ", "(", "."):
        i = line.find(mark)
        if i > 0 and len(line) - (i + len(mark)) >= 6:
            return i + len(mark)
    return None


def main() -> None:
    rng = random.Random(12)
    lines = TEXT.read_text(encoding="utf-8").split("\n")
    usable = [i for i, line in enumerate(lines) if i >= CONTEXT_LINES and 20 <= len(line.strip()) <= 70 and _split(line)]
    picked = rng.sample(usable, N_ITEMS * N_CHOICES)
    items = []
    for k in range(N_ITEMS):
        group = picked[k * N_CHOICES:(k + 1) * N_CHOICES]
        i = group[0]
        cut = _split(lines[i])
        context = "\n".join(lines[i - CONTEXT_LINES:i] + [lines[i][:cut]])
        endings = [lines[j][_split(lines[j]):] for j in group]
        label = rng.randrange(N_CHOICES)
        endings[0], endings[label] = endings[label], endings[0]
        items.append({"context": context, "choices": endings, "label": label})
    OUT.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")


if __name__ == "__main__":
    main()
