"""`eval`: what a packed output does to the model's predictions (evaluate.py: the inputs, their refusals and the
report; windows.py: the original model run twice per window; divergence.py: the scores).

With the command line, the top layer (docs/ARCHITECTURE.md): it runs the engine (kt_runtime's hybrid experts
in a transformers model) beside the converter's checkpoint checks, so it alone may import both; torch,
transformers and the engine are imported when eval runs, never with the command line.
"""
