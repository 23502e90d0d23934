#!/usr/bin/env python3
"""Drop-in for kt-kernel's scripts/convert_cpu_weights_ds4.py (its DeepSeek-V4 tutorial): the same converter as
scripts/convert_cpu_weights.py, which detects DeepSeek-V4-Flash MXFP4 (kt's --input-type fp4) by itself.

    python scripts/convert_cpu_weights_ds4.py --input-path MODEL --input-type fp4 --output OUT \
        --quant-method int4 --cpuinfer-threads 60 --threadpool-count 2
"""
import sys

from kt_convert.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
