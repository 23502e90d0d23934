"""Which tensors --include-non-expert copies into the last shard, and their names: kt-kernel's rule.

kt's converters (kt-kernel/scripts/convert_cpu_weights.py, and convert_cpu_weights_ds4.py for
DeepSeek-V4) load every key with ``language_model.`` removed, then copy each key that is not an
expert tensor by their test, renamed:

* expert test: ``.mlp.experts.`` in the key (the V4 script also ``.ffn.experts.``). So routers
  (``mlp.gate``, ``ffn.gate``, their biases), shared experts (``mlp.shared_experts``,
  ``ffn.shared_experts``) and the non-expert tensors of MTP layers are copied; MTP experts and
  gpt-oss's expert biases (``mlp.experts.gate_up_proj_bias``) are not;
* names: a key starting with ``model.`` becomes ``key.replace("model.layers.", "blk.")
  .replace("model.", "")`` (every occurrence, as Python's str.replace); the V4 script also maps a
  leading ``layers.`` to ``blk.``; other keys are kept.

Our routed-expert tensors are never copied, also where kt's test does not see them (Mixtral-style
``block_sparse_moe.experts``, which kt's scripts do not convert). Two source tensors that would
get one name (kt would keep one of them silently) stop the conversion.
"""
from __future__ import annotations


from kt_convert.kt_runtime.format.byte_orders import parse_merged_key

from .errors import UserError

V4_FAMILIES = ("deepseek_v4", "deepseek_v41")  # V4 key names: kt's convert_cpu_weights_ds4.py (V4.1 keeps V4's keys)


def kt_loaded_key(key: str) -> str:
    """The key kt's loader files a tensor under."""
    return key.replace("language_model.", "")


def is_kt_expert(key: str, family: str) -> bool:
    """kt's expert test on a loaded key."""
    return ".mlp.experts." in key or (family in V4_FAMILIES and ".ffn.experts." in key)


def kt_output_name(key: str, family: str) -> str:
    """kt's name for a copied (loaded) key."""
    if key.startswith("model."):
        return key.replace("model.layers.", "blk.").replace("model.", "")
    if family in V4_FAMILIES and key.startswith("layers."):
        return "blk." + key[len("layers."):]
    return key


def non_expert_tensors(keys, family: str, routed: set[str], where: str) -> list[tuple[str, str]]:
    """(source key, output name) of every tensor the last shard holds, in source key order.

    Raises UserError (naming both source tensors) when two of them would get the same name, or
    one would take the name of a packed expert tensor."""
    out: dict[str, str] = {}  # output name -> source key
    for key in sorted(keys):
        loaded = kt_loaded_key(key)
        if key in routed or is_kt_expert(loaded, family):
            continue
        name = kt_output_name(loaded, family)
        if name in out:
            raise UserError(f"{where}: --include-non-expert would write tensors {out[name]!r} and {key!r} under one "
                            f"name, {name!r} (kt's naming drops 'language_model.' and 'model.' and maps "
                            "'model.layers.' to 'blk.'); remove one of them from the checkpoint, or convert "
                            "without --include-non-expert")
        if parse_merged_key(name) is not None:
            raise UserError(f"{where}: --include-non-expert would copy {key!r} as {name!r}, a packed expert tensor "
                            "name; convert without --include-non-expert")
        out[name] = key
    return sorted(((src, name) for name, src in out.items()), key=lambda t: t[0])
