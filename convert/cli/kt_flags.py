"""kt-kernel's convert_cpu_weights.py flags that this converter does not support: each gets a message
saying what is supported and what to use instead (checked before click parses, which would
otherwise answer "No such option: --profile Did you mean --progress?")."""
from __future__ import annotations

from kt_convert.quant.source_formats import SUPPORTED

from ..errors import UserError

# flag -> why not, and what to do
UNSUPPORTED_FLAGS = {
    "--profile": "kt's --profile (a torch profiler trace of its conversion) is not supported here: each layer's "
                 "GB/s is printed as it finishes and --json PATH writes the run's bytes and seconds; "
                 "scripts/bench_convert.py compares a conversion with reading the same files",
    "--save-backward-weights": "kt's --save-backward-weights (transposed *_bwd_* weights for kt's SFT wrapper) is "
                               "not supported: the output holds the forward weights that SGLang-KT and kt_runtime "
                               "load; use kt-kernel's own script for fine-tuning weights",
}
# (flag, value) -> why not, and what to do
UNSUPPORTED_VALUES = {
    ("--input-type", "awq"): f"AWQ checkpoints are not supported (supported: {SUPPORTED}); convert the original "
                             "BF16 or FP8 checkpoint of the model instead (--input-type auto detects it)",
    ("--quant-method", "awq"): "--quant-method awq (kt's AWQ repacking for its GPU path) is not supported: this "
                               "converter writes the CPU formats, --quant-method int4 (AMXINT4) or int8 (AMXINT8)",
    ("--quant-method", "moe_int4"): "--quant-method moe_int4 is kt-kernel's ARM (KML) backend, which kt does not "
                                    "build on x86: use --quant-method int4 (AMXINT4), which kt_runtime also runs "
                                    "with AVX-512 or AVX2 where there is no AMX",
    ("--quant-method", "moe_int8"): "--quant-method moe_int8 (kt's generic moe_kernel format) is not written "
                                    "here: use --quant-method int8 (AMXINT8), which kt_runtime also runs with "
                                    "AVX-512 or AVX2 where there is no AMX",
}
GPU_NOTE = ("note: --gpu (kt's flag) is accepted: --device auto, the default, already dequantizes and packs on a "
            "GPU when CUDA and triton are present; --device cuda requires one, --device cpu never uses it")


def check_kt_flags(args: list[str]) -> None:
    """UserError for the first kt flag or value that is not supported (up to a `--`)."""
    for i, arg in enumerate(args):
        if arg == "--":
            return
        flag, eq, value = arg.partition("=")
        if flag in UNSUPPORTED_FLAGS:
            raise UserError(UNSUPPORTED_FLAGS[flag])
        if not eq and i + 1 < len(args):
            value = args[i + 1]
        if (flag, value) in UNSUPPORTED_VALUES:
            raise UserError(UNSUPPORTED_VALUES[(flag, value)])
