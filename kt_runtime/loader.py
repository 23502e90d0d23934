"""Load packed experts (merged safetensors shards or kt .kt folders) zero-copy and validated."""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format.layout import (FORMAT_VERSION, MANIFEST_FILE, METHOD_INFO, PROJECTIONS, kt_file_names, kt_file_paths,
                     layer_dir_name, layer_tensor_entries, merged_key, shard_shape, weight_bytes)
from .format.digest import tree_sha256_files
from .format.errors import FieldError, InputFileError, ManifestError, PackedWeightsError, SafetensorsFormatError
from .format.input_files import CONFIG_MAX_BYTES, check_regular, containment_root, read_json, resolve_inside
from .format.json_fields import get_int, get_number
from .format.manifest import Manifest, read_manifest
from .format.safetensors_file import SafetensorsFile


@dataclass(frozen=True)
class ModelDims:
    method: str
    threadpool_count: int
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    layers: tuple[int, ...]
    activation: str = "silu"
    swiglu_limit: float | None = None


class PackedExperts:
    """Packed routed experts of every converted layer, memory-mapped.

    `expert_tensors(layer, expert, proj, numa)` gives the tiled bytes and fp32 scales of one NUMA
    shard (read-only views of the mapped files); `dequantize(layer, expert, proj)` the whole float
    matrix ([I, H] for gate/up, [H, I] for down).
    """

    def __init__(self, path: Path, dims: ModelDims, manifest: Manifest | None, tensors: dict):
        self.path = path
        self.manifest = manifest
        self.dims = dims
        self._tensors = tensors  # (layer, expert, proj, numa) -> (weight view, scale view)

    method = property(lambda self: self.dims.method)
    threadpool_count = property(lambda self: self.dims.threadpool_count)
    hidden_size = property(lambda self: self.dims.hidden_size)
    moe_intermediate_size = property(lambda self: self.dims.moe_intermediate_size)
    num_experts = property(lambda self: self.dims.num_experts)
    num_experts_per_tok = property(lambda self: self.dims.num_experts_per_tok)
    layers = property(lambda self: list(self.dims.layers))
    activation = property(lambda self: self.dims.activation)
    swiglu_limit = property(lambda self: self.dims.swiglu_limit)

    @property
    def partial(self) -> bool:
        """Converted with --layers: some MoE layers of the model are not in this output."""
        return bool(self.manifest is not None and self.manifest.partial)

    @property
    def model_layers(self) -> list[int]:
        """Every MoE layer of the source model (the same as `layers` unless partial)."""
        recorded = self.manifest.model_layers if self.manifest is not None else None
        return list(recorded) if recorded is not None else self.layers

    def __repr__(self) -> str:
        d = self.dims
        return (f"PackedExperts({str(self.path)!r}, method={d.method}, threadpool_count={d.threadpool_count}, "
                f"layers={len(d.layers)}{' of ' + str(len(self.model_layers)) + ' (partial)' if self.partial else ''}, "
                f"experts={d.num_experts}, hidden={d.hidden_size}, intermediate={d.moe_intermediate_size})")

    def _check_index(self, layer: int, expert: int, proj: str, numa: int = 0) -> None:
        if layer not in self.dims.layers:
            raise KeyError(f"layer {layer} is not in this output (layers: {list(self.dims.layers)})")
        if not 0 <= expert < self.dims.num_experts:
            raise KeyError(f"expert {expert} out of range [0, {self.dims.num_experts})")
        if proj not in PROJECTIONS:
            raise KeyError(f"projection {proj!r} is not one of {PROJECTIONS}")
        if not 0 <= numa < self.dims.threadpool_count:
            raise KeyError(f"NUMA shard {numa} out of range [0, {self.dims.threadpool_count})")

    def expert_tensors(self, layer: int, expert: int, proj: str, numa: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_index(layer, expert, proj, numa)
        return self._tensors[(layer, expert, proj, numa)]

    def dequantize(self, layer: int, expert: int, proj: str) -> "torch.Tensor":
        import torch

        from quant import get_method
        from quant.reference import dequantize_packed, merge_shards

        self._check_index(layer, expert, proj)
        d = self.dims
        method = get_method(d.method)
        n, k = shard_shape(proj, d.hidden_size, d.moe_intermediate_size, d.threadpool_count)
        parts = []
        for t in range(d.threadpool_count):
            w, s = self._tensors[(layer, expert, proj, t)]
            parts.append(dequantize_packed(torch.from_numpy(np.array(w)), torch.from_numpy(np.array(s)), n, k, method))
        return merge_shards(proj, parts)


def _fail(msg: str) -> PackedWeightsError:
    return PackedWeightsError(msg)


def _checked_file(root: Path, name: str, named_by: str | None = None, missing: str = "",
                  boundary: Path | None = None) -> Path:
    """root/name after the input rules (kt_runtime.format.input_files): inside the output folder (or its
    hub-cache repo folder: `boundary`, computed once by the caller), a regular file. missing: the
    message tail when it does not exist."""
    try:
        resolve_inside(root, name, named_by=named_by, root=boundary)
        check_regular(root / name)
    except FileNotFoundError:
        raise _fail(f"{root / name}: missing{missing}") from None
    except InputFileError as e:
        raise _fail(f"{e}; this output cannot be trusted: re-run the conversion into an empty directory") from None
    return root / name


def _dims_from_manifest(m: Manifest) -> ModelDims:
    return ModelDims(m.method, m.threadpool_count, m.hidden_size, m.moe_intermediate_size, m.num_experts,
                     m.num_experts_per_tok, tuple(m.layers), m.activation, m.swiglu_limit)


def _check_entry(st: SafetensorsFile, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in st:
        raise _fail(f"{st.path}: tensor {key} is missing; the output is incomplete: re-run the conversion")
    info = st.tensors[key]
    if info.dtype != dtype or tuple(info.shape) != shape:
        raise _fail(f"{st.path}: tensor {key} is {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}: "
                    "the file does not match the manifest (was it converted with other settings?)")
    arr = st.array(key)
    return arr.view(np.uint8) if dtype == "I8" else arr


# Facts every merged shard carries in its __metadata__ (convert.pipeline.shard_metadata), as strings.
def _shard_facts(dims: ModelDims, layer: int, manifest: Manifest | None) -> dict[str, str]:
    facts = {"kt_format_version": FORMAT_VERSION, "quant_method": dims.method,
             "kt_method": METHOD_INFO[dims.method][0], "threadpool_count": dims.threadpool_count,
             "hidden_size": dims.hidden_size, "moe_intermediate_size": dims.moe_intermediate_size,
             "num_experts": dims.num_experts, "layer": layer}
    if manifest is not None:
        facts.update(num_experts_per_tok=manifest.num_experts_per_tok, activation=manifest.activation,
                      swiglu_limit=manifest.swiglu_limit, source_fingerprint=manifest.source.get("fingerprint"))
    return {k: "" if v is None else str(v) for k, v in facts.items()}


def _check_metadata(st: SafetensorsFile, facts: dict[str, str], strict: bool) -> None:
    """strict (a manifest is present): every fact must be there and agree; otherwise those present must agree."""
    for key, want in facts.items():
        got = st.metadata.get(key)
        if got is None and not strict:
            continue
        if got != want:
            raise _fail(f"{st.path}: __metadata__ {key} is {got!r} but the "
                        f"{'manifest says' if strict else 'tensors say'} {want!r}: the shard belongs to another "
                        "conversion or was edited; re-run the conversion into an empty directory")


def _merged_tensors(path: Path, dims: ModelDims, files: dict[int, list[str]], manifest: Manifest | None = None) -> dict:
    tensors = {}
    open_files: dict[str, SafetensorsFile] = {}
    boundary = containment_root(path)
    for layer in dims.layers:
        by_key: dict[str, SafetensorsFile] = {}
        facts = _shard_facts(dims, layer, manifest)
        for name in files[layer]:
            if name not in open_files:
                open_files[name] = SafetensorsFile(_checked_file(path, name, boundary=boundary))
                _check_metadata(open_files[name], facts, strict=manifest is not None)
            by_key.update(dict.fromkeys(open_files[name].keys(), open_files[name]))
        where = open_files[files[layer][0]]
        for key, dtype, shape in layer_tensor_entries(layer, dims.method, dims.num_experts, dims.hidden_size,
                                                      dims.moe_intermediate_size, dims.threadpool_count):
            by_key[key] = _check_entry(by_key.get(key, where), key, dtype, shape)
        for expert in range(dims.num_experts):
            for proj in PROJECTIONS:
                for t in range(dims.threadpool_count):
                    tensors[(layer, expert, proj, t)] = (by_key[merged_key(layer, proj, expert, t, "weight")],
                                                         by_key[merged_key(layer, proj, expert, t, "scale")])
    return tensors


def _kt_folder_tensors(path: Path, dims: ModelDims) -> dict:
    tensors = {}
    boundary = containment_root(path)
    for layer in dims.layers:
        for expert in range(dims.num_experts):
            for proj in PROJECTIONS:
                n, k = shard_shape(proj, dims.hidden_size, dims.moe_intermediate_size, dims.threadpool_count)
                q = weight_bytes(dims.method, n, k)
                for t in range(dims.threadpool_count):
                    wpath, spath = kt_file_paths(path, layer, t, dims.method, proj, expert, q, n)
                    arrays = []
                    for p, dtype, count in ((wpath, np.uint8, q), (spath, np.float32, n)):
                        _checked_file(path, str(p.relative_to(path)), boundary=boundary,
                                      missing="; the output is incomplete: re-run the conversion")
                        if p.stat().st_size != count * np.dtype(dtype).itemsize:
                            raise _fail(f"{p}: {p.stat().st_size} bytes, expected {count * np.dtype(dtype).itemsize}")
                        arrays.append(np.memmap(p, dtype=dtype, mode="r", shape=(count,)))
                    tensors[(layer, expert, proj, t)] = tuple(arrays)
    return tensors


def _layer_files(path: Path, m: Manifest) -> dict[int, list[str]]:
    files = {}
    for layer in m.layers:
        rec = m.completed.get(layer)
        if rec is None:
            raise _fail(f"{path}: layer {layer} was never completed (the conversion was interrupted): "
                        "re-run the same convert command to finish it")
        files[layer] = rec.files
    return files


def _layer_data_bytes(dims: ModelDims) -> int:
    """Packed bytes of one layer's tensors (weights + fp32 scales), without headers or padding."""
    per_expert = 0
    for proj in PROJECTIONS:
        n, k = shard_shape(proj, dims.hidden_size, dims.moe_intermediate_size, dims.threadpool_count)
        per_expert += dims.threadpool_count * (weight_bytes(dims.method, n, k) + 4 * n)
    return dims.num_experts * per_expert


def _kt_layer_files(dims: ModelDims, layer: int) -> list[str]:
    names = []
    for expert in range(dims.num_experts):
        for proj in PROJECTIONS:
            n, k = shard_shape(proj, dims.hidden_size, dims.moe_intermediate_size, dims.threadpool_count)
            for t in range(dims.threadpool_count):
                names += [f"{layer_dir_name(layer)}/_numa_{t}/{f}"
                          for f in kt_file_names(dims.method, proj, expert, weight_bytes(dims.method, n, k), n)]
    return names


def _check_layer_records(path: Path, m: Manifest, dims: ModelDims) -> None:
    """The manifest's dims against each layer record's size and file list: cheap, before opening anything."""
    data = _layer_data_bytes(dims)
    for layer in m.layers:
        rec = m.completed[layer]
        if m.layout == "kt-folders":
            count = dims.num_experts * len(PROJECTIONS) * dims.threadpool_count * 2
            if len(rec.files) != count or rec.nbytes != data:
                raise _fail(f"{path}: layer {layer} lists {len(rec.files)} files of {rec.nbytes} bytes, but "
                            f"{dims.num_experts} experts x {dims.threadpool_count} NUMA shards of {dims.method} "
                            f"need {count} files of {data} bytes: the manifest does not match the output")
            if set(rec.files) != set(_kt_layer_files(dims, layer)):
                raise _fail(f"{path}: layer {layer} lists files other than the kt names for its dims: "
                            "the manifest does not match the output")
        elif rec.nbytes < data + 8:
            raise _fail(f"{path}: layer {layer} is {rec.nbytes} bytes in the manifest, but {dims.num_experts} experts "
                        f"x {dims.threadpool_count} NUMA shards of {dims.method} need at least {data}: "
                        "the manifest does not match the output")


def _verify_layer_files(path: Path, m: Manifest, verify: bool) -> None:
    boundary = containment_root(path)
    for layer in m.layers:
        rec = m.completed[layer]
        paths = [_checked_file(path, f, f"{path / MANIFEST_FILE}: completed[{layer}].files",
                               f" although the manifest lists layer {layer} as complete", boundary) for f in rec.files]
        size = sum(p.stat().st_size for p in paths)
        if size != rec.nbytes:
            raise _fail(f"{path}: layer {layer} files hold {size} bytes, the manifest says {rec.nbytes}: "
                        "the output is damaged; re-convert this layer (delete its files and re-run)")
        if verify and tree_sha256_files(paths) != rec.sha256:
            raise _fail(f"{path}: layer {layer} files do not match their sha256 in the manifest: the output is "
                        "damaged; re-convert this layer (delete its files and re-run)")


def load_experts(path: str | Path, verify: bool = True) -> PackedExperts:
    """Open a packed output directory.

    With a kt_manifest.json, everything is checked against it (sizes always, sha256 unless
    verify=False). A kt-kernel output without one is loaded with parameters inferred from its
    tensors and a warning.
    """
    path = Path(path)
    if not path.is_dir():
        raise _fail(f"{path}: not a directory of packed experts")
    try:
        manifest = read_manifest(path)
    except ManifestError as e:
        raise _fail(str(e)) from None
    try:
        if manifest is None:
            warnings.warn(f"{path}: no kt_manifest.json; parameters are inferred from the tensors "
                          "and nothing can be checked against the source", stacklevel=2)
            dims, tensors = _infer_kt_output(path)
            return PackedExperts(path, dims, None, tensors)
        dims = _dims_from_manifest(manifest)
        if manifest.partial:
            missing = sorted(set(manifest.model_layers or []) - set(manifest.layers))
            warnings.warn(f"{path}: a partial output (converted with --layers): it holds MoE layers "
                          f"{list(manifest.layers)} of the model, not {missing}; a model needs every MoE layer, "
                          "so serve it only beside another source of those layers", stacklevel=2)
        files = _layer_files(path, manifest)
        _check_layer_records(path, manifest, dims)
        _verify_layer_files(path, manifest, verify)
        if manifest.layout == "merged":
            tensors = _merged_tensors(path, dims, files, manifest)
        else:
            tensors = _kt_folder_tensors(path, dims)
        return PackedExperts(path, dims, manifest, tensors)
    except SafetensorsFormatError as e:
        raise _fail(f"{e}") from None
    except OSError as e:
        raise _fail(f"{e.filename or path}: cannot read ({e.strerror or e})") from None


_MERGED_KEY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(\d+)\.numa\.(\d+)\.(weight|scale)$")
_KT_FILE = re.compile(r"^(INT4|INT8)_(gate|up|down)_(\d+)_(\d+)Byte_(quant|scale)_\.kt$")
_LAYER_DIR = re.compile(r"^_layer_(\d+)$")
_NUMA_DIR = re.compile(r"^_numa_(\d+)$")


def _config_facts(path: Path) -> tuple[int, str, float | None]:
    """top-k and swiglu_limit from the config.json copied beside an output without a manifest."""
    where = path / "config.json"
    cfg = {}
    if os.path.lexists(where):
        try:
            resolve_inside(path, "config.json")
            cfg = read_json(where, what="config.json", max_bytes=CONFIG_MAX_BYTES)
            if isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):
                cfg = {**cfg, **cfg["text_config"]}
            top_k = get_int(cfg, "num_experts_per_tok", str(where), lo=1, default=2)
            limit = get_number(cfg, "swiglu_limit", str(where), positive=True, default=None)
        except FileNotFoundError:
            raise _fail(f"{where}: a symlink to a missing file; delete it or copy the model's config.json") from None
        except (InputFileError, FieldError) as e:
            raise _fail(f"{e}; fix or delete {where}") from None
        return top_k, "silu", limit
    return 2, "silu", None


def _infer_dims(path: Path, layers: set, experts: set, numas: set, gate_n: int, down_n: int, gate_bytes: int,
                counts: dict[int, int]):
    if not layers:
        raise _fail(f"{path}: no packed expert tensors found (expected blk.L.ffn_*_exps.E.numa.T.* or _layer_L/ folders)")
    threadpool_count, num_experts = max(numas) + 1, max(experts) + 1
    expected = num_experts * len(PROJECTIONS) * threadpool_count * 2
    for layer in sorted(layers):  # before anything is sized from these numbers
        if counts.get(layer, 0) != expected:
            raise _fail(f"{path}: layer {layer} holds {counts.get(layer, 0)} packed expert tensors, but experts "
                        f"0..{num_experts - 1} x 3 projections x {threadpool_count} NUMA shards x (weight, scale) are "
                        f"{expected}: experts or NUMA shards are missing; re-convert")
    inter, hidden = gate_n * threadpool_count, down_n
    per_byte = gate_n * hidden / gate_bytes if gate_bytes else 0
    method = {2: "int4", 1: "int8"}.get(per_byte) if gate_n > 0 and hidden > 0 else None
    if method is None:
        raise _fail(f"{path}: cannot infer INT4/INT8 from a gate shard of {gate_bytes} bytes for {gate_n}x{hidden}")
    align = METHOD_INFO[method][4]
    if hidden % align or gate_n % align:
        raise _fail(f"{path}: inferred hidden size {hidden} and per-NUMA intermediate size {gate_n} are not multiples "
                    f"of {align}, which {method} needs: not a kt-kernel output, or a damaged one")
    top_k, activation, limit = _config_facts(path)
    return ModelDims(method, threadpool_count, hidden, inter, num_experts, min(top_k, num_experts),
                     tuple(sorted(layers)), activation, limit)


def _infer_kt_output(path: Path):
    shards = sorted(path.glob("*.safetensors"))
    if shards:  # kt's loader takes the merged layout whenever a top-level *.safetensors exists
        files: dict[int, list[str]] = {}
        layers, experts, numas = set(), set(), set()
        counts: dict[int, int] = {}
        gate_n = down_n = gate_bytes = 0
        boundary = containment_root(path)
        for shard in shards:
            st = SafetensorsFile(_checked_file(path, shard.name, boundary=boundary))
            for key, info in st.tensors.items():
                m = _MERGED_KEY.match(key)
                if not m:
                    continue
                layer, proj, expert, numa, part = int(m[1]), m[2], int(m[3]), int(m[4]), m[5]
                if info.dtype != ("F32" if part == "scale" else "I8") or len(info.shape) != 1:
                    raise _fail(f"{shard}: tensor {key} is {info.dtype}{list(info.shape)}, expected a 1-D "
                                f"{'F32' if part == 'scale' else 'I8'} tensor: not a kt-kernel output, or a damaged one")
                layers.add(layer); experts.add(expert); numas.add(numa)
                counts[layer] = counts.get(layer, 0) + 1
                files.setdefault(layer, [])
                if shard.name not in files[layer]:
                    files[layer].append(shard.name)
                if (proj, expert, numa) == ("gate", 0, 0):
                    if part == "scale":
                        gate_n = info.shape[0]
                    else:
                        gate_bytes = info.nbytes
                if (proj, expert, numa, part) == ("down", 0, 0, "scale"):
                    down_n = info.shape[0]
            st.close()
        dims = _infer_dims(path, layers, experts, numas, gate_n, down_n, gate_bytes, counts)
        return dims, _merged_tensors(path, dims, files)
    layers, experts, numas = set(), set(), set()
    counts = {}
    gate_n = down_n = gate_bytes = 0
    for folder in path.glob("_layer_*/_numa_*"):
        lm, nm = _LAYER_DIR.match(folder.parent.name), _NUMA_DIR.match(folder.name)
        if not lm or not nm or not folder.is_dir():
            continue  # e.g. _layer_5.tmp/ left by an interrupted run
        layer, numa = int(lm[1]), int(nm[1])
        for f in folder.iterdir():
            m = _KT_FILE.match(f.name)
            if not m:
                continue
            layers.add(layer); numas.add(numa); experts.add(int(m[3]))
            counts[layer] = counts.get(layer, 0) + 1
            if (m[2], int(m[3]), numa) == ("gate", 0, 0):
                if m[5] == "scale":
                    gate_n = int(m[4]) // 4
                else:
                    gate_bytes = int(m[4])
            if (m[2], int(m[3]), numa, m[5]) == ("down", 0, 0, "scale"):
                down_n = int(m[4]) // 4
    dims = _infer_dims(path, layers, experts, numas, gate_n, down_n, gate_bytes, counts)
    return dims, _kt_folder_tensors(path, dims)
