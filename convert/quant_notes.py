"""What a run says about the numbers it writes, beside the sizes: whether an already-quantized source is carried
over exactly or quantized again (lossy), and what kt-kernel's own RAWINT4 kernels compute wrongly, as measured
with kt-kernel itself (docs/FORMAT.md §9, scripts/kt_compat.py). The pre-flight prints these lines before any
layer is converted, `verify` the ones about the output's codes."""
from __future__ import annotations

import numpy as np

from kt_convert.kt_runtime.format.safetensors_file import DTYPE_BITS
from kt_convert.quant.source_formats import SOURCE_FORMATS, carries_codes

KT_GROUP_SIZE = 32  # the group size kt's AMX/AVX-512 RAWINT4 kernel computes

MINUS8_EFFECT = (
    "kt-kernel built from its repository up to 95009ea (2026-08-21) computes that level as +8 in AMXInt4_KGroup, its "
    "RAWINT4 kernel on AVX-512/AMX CPUs, whenever the activation is negative: its MoE output on a K2-style layer "
    "was off by 5.2 times the right output's size (519% relative error), against 1.1% with codes -7..7 "
    "(kt-kernel 0.7.2 from PyPI computes -8 right: 1.1% either way); kt reading the original checkpoint does the "
    "same")
GROUP_EFFECT = (
    "kt-kernel's RAWINT4 kernel on AVX-512/AMX CPUs (AMXInt4_KGroup, its default there) computes group 32 only: with "
    "groups of {group} its MoE output is NaN or it crashes (kt-kernel 0.7.2 and 95009ea); serve this output with "
    "KT_RAWINT4_BACKEND=avxvnni (needs a CPU with AVX-VNNI), or convert with --group-size 32")


def _source_kinds(plan, ckpt) -> set[tuple[str, int | None, int]]:
    """(kind, group or None, scale item size) of every projection the plan reads."""
    kinds = set()
    for lp in plan.layers:
        for expert in lp.experts:
            for src in expert.values():
                group = src.block[1] if src.kind == "int4_group" else None
                itemsize = DTYPE_BITS[ckpt.info(src.scale_key).dtype] // 8 if src.scale_key is not None else 0
                kinds.add((src.kind, group, itemsize))
    return kinds


def grid_lines(plan, ckpt) -> list[str]:
    """The pre-flight's lines about the codes: exact carry or lossy requantization of a source already on an
    INT4 grid (the one source format with an exact path: MXFP4 and FP8 have none into kt's formats), the level
    -8 in a carried source (sampled from one matrix), a group size kt computes wrongly."""
    method = plan.method
    lines = []
    kinds = _source_kinds(plan, ckpt)
    carried = {(k, g, i) for k, g, i in kinds if carries_codes(method, k, (1, g or 0), i)}
    if carried and carried == kinds:
        groups = sorted({g for _, g, _ in carried})
        lines.append(f"pre-flight: exact: the source's INT4 codes and bf16 scales (groups of {_list(groups)}) are "
                     f"carried over into {method.kt_method} groups of {method.group_size}, nothing is quantized again "
                     "(verify --source reports 0 error)")
        lines += _minus8_sample(plan, ckpt)
    elif any(k == "int4_group" for k, _, _ in kinds):
        lines.append(f"pre-flight: lossy: the source is already quantized ({SOURCE_FORMATS['int4_group'].description}"
                     f"{_groups(kinds)}); "
                     f"{method.kt_method}{_group(method)} quantizes it again (verify --source measures the error)"
                     + _exact_hint(kinds, method))
    if method.group_size is not None and method.group_size != KT_GROUP_SIZE:
        lines.append("note: " + GROUP_EFFECT.format(group=method.group_size))
    return lines


def _list(values) -> str:
    return ", ".join(map(str, values))


def _group(method) -> str:
    return f" group {method.group_size}" if method.group_size is not None else ""


def _groups(kinds) -> str:
    groups = sorted({g for k, g, _ in kinds if k == "int4_group"})
    return f", groups of {_list(groups)}" if groups else ""


def _exact_hint(kinds, method) -> str:
    """Where another --quant-method / --group-size would carry the source exactly."""
    int4 = {(g, i) for k, g, i in kinds if k == "int4_group"}
    if len(int4) != 1 or len(kinds) != 1:
        return ""
    group, itemsize = next(iter(int4))
    if itemsize != 2:
        return ""  # float32 scales: no bf16 grid to carry
    fits = [g for g in (32, 64, 128) if group % g == 0]
    if not fits:
        return ""
    best = KT_GROUP_SIZE if KT_GROUP_SIZE in fits else fits[-1]
    return f"; exact instead: --quant-method rawint4 --group-size {best} carries its codes"


def minus8_count(packed: np.ndarray) -> int:
    """Codes of the level -8 (stored nibble 0) in offset-binary INT4 bytes or int32 words."""
    b = np.ascontiguousarray(packed).view(np.uint8).reshape(-1)
    return int(np.count_nonzero((b & 0x0F) == 0) + np.count_nonzero((b >> 4) == 0))


def minus8_line(count: int, total: int, where: str) -> str | None:
    """The warning for an output (or source) whose codes use -8; None when none does."""
    if not count:
        return None
    return (f"note: {where} uses the level -8 in {count} of {total} codes ({100 * count / total:.2f}%): "
            + MINUS8_EFFECT)


def _minus8_sample(plan, ckpt) -> list[str]:
    """The level -8 in one carried matrix (the first layer's expert 0 gate), read now; not for a source still
    being downloaded (its file may not be there yet)."""
    if not ckpt.gate.holds_every_file or not plan.layers:
        return []
    key = plan.layers[0].experts[0]["gate"].weight_key
    words = ckpt.read_tensor(key)
    line = minus8_line(minus8_count(words), words.size * 8, f"the source ({key}, carried as it is)")
    return [line] if line else []
