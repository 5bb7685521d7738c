"""The benchmark suite of `lmlab bench` (the module `lmlab.benchsuite.suite`), run as a script:

    .venv/bin/python benchmarks/suite.py run OPTIONS     (what `lmlab bench` runs: python -m lmlab.benchsuite.suite)
    .venv/bin/python benchmarks/suite.py memory SPEC     (one peak-memory measurement)
"""

from __future__ import annotations

import sys

from lmlab.benchsuite.suite import main

if __name__ == "__main__":
    main(*sys.argv[1:3])
