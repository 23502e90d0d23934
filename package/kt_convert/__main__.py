"""`python -m kt_convert`: the convert-cpu-weights program."""
import sys

from .convert.cli import main

sys.exit(main())
