"""Import-time behaviour when FAISS is missing."""

from __future__ import annotations

import subprocess
import sys


def test_import_without_faiss_names_the_extras():
    code = (
        "import sys; sys.modules['faiss'] = None\n"
        "try:\n    import ocbank\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ocbank[cpu]" in out and "ocbank[gpu]" in out
