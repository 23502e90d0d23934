"""What the tests share, imported by name (fixtures that every test may use stay in conftest.py):

    outputs      digests of an output's files, a JSON file read back
    numerics     random packer inputs, the rows that pin down kt-kernel's exact numerics, the ISA levels
    checkpoints  edits of a synthetic checkpoint's shards, and what a refused run must not leave
    hangs        the deadline: a test that blocks fails instead of hanging the run
    hub          a local hub for a test: its fixture, the environment and the command line
    moe          FakeExperts (packed experts without files) and the float MoE of the tests
    engine_knobs the engine's tuning knobs set for a block (kt_kernels._testing.knob)
    fake_cuda    a stand-in for torch's CUDA side (convert.packers.CudaPacker's host logic on a CPU)
    tiny_models  tiny transformers MoE models, saved, converted and run
    prefill      the GPU prefill's cases (test_gpu_prefill*.py)
    stream       the stream-ordered path's packed layer and routing (test_hybrid_stream.py, test_hybrid_gpu.py)
    watch        a file outside the output, watched for any change (the hostile-input tests)
    kt           scripts/kt_compat.py as a module (the real kt-kernel, in child processes)
    namespace    the package's folders, and its modules loaded under another name than kt_convert.*
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
