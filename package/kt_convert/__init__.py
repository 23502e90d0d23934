"""kt-convert: the routed experts of MoE checkpoints as kt-kernel's packed CPU weights, and a runtime for them.

One import name. Its subpackages are the repository's folders of the same names:

    kt_convert.convert     the converter and its CLI (convert-cpu-weights, or python -m kt_convert)
    kt_convert.quant       numerics: decoders, kt's quantization and tiling, the CPU and GPU packers
    kt_convert.kt_runtime  load packed experts and run them beside a model (alias: import kt_runtime)
    kt_convert.synthetic   synthetic checkpoints: the tests' oracle, the demo's and the benchmarks' models
    kt_convert.kt_kernels  the C++ extension built from kernels_cpp/: packers and the CPU MoE engine

Nothing is imported here, so that `import kt_convert.kt_runtime.format` stays free of torch.
"""
