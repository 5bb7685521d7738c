"""Smoke studies on a busy CPU (the module `lmlab.benchsuite.busy_cpu`), run as a script:

    .venv/bin/python benchmarks/busy_cpu.py [--studies hylorada mu] [--rounds 3] [--load busy idle]
                                            [--baseline-src DIR] [--variants NAME ...] [--out benchmarks/results]
    .venv/bin/python benchmarks/busy_cpu.py --pool RESULT.json ...   (idle default / before-default, pooled)
"""

from __future__ import annotations

from lmlab.benchsuite.busy_cpu import main

if __name__ == "__main__":
    main()
