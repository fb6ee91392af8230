"""The runtime package runs with numpy and tokenizers alone: importing it never imports torch."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_never_imports_torch():
    code = (
        "import sys, skiptree, skiptree.runtime.generation, skiptree.runtime.generator, "
        "skiptree.runtime.sampling, skiptree.runtime.tokenizer\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'skiptree.compiler', 'skiptree.passes',"
        " 'skiptree.models') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
