#!/usr/bin/env python3
"""Drop-in for kt-kernel's scripts/convert_cpu_weights.py: same arguments, same output layout.

    python scripts/convert_cpu_weights.py --input-path MODEL --input-type fp4 --output OUT \
        --quant-method int4 --cpuinfer-threads 60 --threadpool-count 2
"""
import sys

from kt_convert.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
