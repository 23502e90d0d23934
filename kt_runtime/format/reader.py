"""The reader of a packed output (merged safetensors shards or kt .kt folders): every file checked against
the manifest, then mapped; numpy views of each pair, nothing copied (docs/FORMAT.md §5).

torch-free: kt_runtime.loader puts the runtime's face on it (PackedExperts.dequantize, through quant), and
`verify` reads through it without the engine.
"""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np

from .byte_orders import AMX_TILED, parse_merged_key
from .digest import tree_sha256_files
from .errors import FieldError, InputFileError, ManifestError, PackedWeightsError, SafetensorsFormatError
from .fsio import list_dir, names_ending
from .input_files import CONFIG_MAX_BYTES, check_regular, containment_root, map_regular, read_json, resolve_inside
from .json_fields import get_int, get_number
from .manifest import Manifest, read_manifest, shard_metadata_problem
from .methods import METHODS, alignment_problem
from .names import (KT_FOLDERS, KT_SFT_MANIFEST_FILE, LAYER_DIR, MANIFEST_FILE, MERGED, NUMA_DIR, PROJECTIONS,
                    STATE_DIR_SUFFIX, state_dir)
from .safetensors_file import SafetensorsFile, numpy_dtype
from .spec import PackedSpec, kt_file_paths, parse_kt_file_name
from .verified import is_verified, read_verified, record_verified


class PackedOutput:
    """Packed routed experts of every converted layer, memory-mapped.

    `expert_tensors(layer, expert, proj, numa)` gives the weight bytes and scales of one NUMA shard
    (read-only views of the mapped files), in the method's byte order.
    """

    def __init__(self, path: Path, spec: PackedSpec, manifest: Manifest | None, tensors: dict):
        self.path = path
        self.manifest = manifest
        self.spec = spec
        self._tensors = tensors  # (layer, expert, proj, numa) -> (weight view, scale view)

    method = property(lambda self: self.spec.method)
    threadpool_count = property(lambda self: self.spec.threadpool_count)
    hidden_size = property(lambda self: self.spec.hidden_size)
    moe_intermediate_size = property(lambda self: self.spec.moe_intermediate_size)
    num_experts = property(lambda self: self.spec.num_experts)
    num_experts_per_tok = property(lambda self: self.spec.num_experts_per_tok)
    layers = property(lambda self: list(self.spec.layers))
    activation = property(lambda self: self.spec.activation)
    swiglu_limit = property(lambda self: self.spec.swiglu_limit)

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
        d = self.spec
        return (f"{type(self).__name__}({str(self.path)!r}, method={d.method}, threadpool_count={d.threadpool_count}, "
                f"layers={len(d.layers)}{' of ' + str(len(self.model_layers)) + ' (partial)' if self.partial else ''}, "
                f"experts={d.num_experts}, hidden={d.hidden_size}, intermediate={d.moe_intermediate_size})")

    def _check_index(self, layer: int, expert: int, proj: str, numa: int = 0) -> None:
        if layer not in self.spec.layers:
            raise KeyError(f"layer {layer} is not in this output (layers: {list(self.spec.layers)})")
        if not 0 <= expert < self.spec.num_experts:
            raise KeyError(f"expert {expert} out of range [0, {self.spec.num_experts})")
        if proj not in PROJECTIONS:
            raise KeyError(f"projection {proj!r} is not one of {PROJECTIONS}")
        if not 0 <= numa < self.spec.threadpool_count:
            raise KeyError(f"NUMA shard {numa} out of range [0, {self.spec.threadpool_count})")

    def expert_tensors(self, layer: int, expert: int, proj: str, numa: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_index(layer, expert, proj, numa)
        return self._tensors[(layer, expert, proj, numa)]


def _checked_file(root: Path, name: str, named_by: str | None = None, missing: str = "",
                  boundary: Path | None = None) -> Path:
    """root/name after the input rules (kt_runtime.format.input_files): inside the output folder (or its
    hub-cache repo folder: `boundary`, computed once by the caller), a regular file. missing: the
    message tail when it does not exist."""
    try:
        resolve_inside(root, name, named_by=named_by, root=boundary)
        check_regular(root / name)
    except FileNotFoundError:
        raise PackedWeightsError(f"{root / name}: missing{missing}") from None
    except InputFileError as e:
        raise PackedWeightsError(f"{e}; this output cannot be trusted: re-run the conversion into an empty directory") from None
    return root / name


def _check_entry(st: SafetensorsFile, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in st:
        raise PackedWeightsError(f"{st.path}: tensor {key} is missing; the output is incomplete: re-run the conversion")
    info = st.tensors[key]
    if info.dtype != dtype or tuple(info.shape) != shape:
        raise PackedWeightsError(f"{st.path}: tensor {key} is {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}: "
                    "the file does not match the manifest (was it converted with other settings?)")
    arr = st.array(key)
    return arr.view(np.uint8) if dtype in ("I8", "I32") else arr


def _check_metadata(st: SafetensorsFile, spec: PackedSpec, layer: int, manifest: Manifest | None) -> None:
    problem = shard_metadata_problem(st.metadata, spec, layer, manifest)
    if problem is not None:
        raise PackedWeightsError(f"{st.path}: {problem}: the shard belongs to another conversion or was edited; "
                                 "re-run the conversion into an empty directory")


def _merged_tensors(path: Path, spec: PackedSpec, files: dict[int, list[str]], manifest: Manifest | None = None) -> dict:
    tensors = {}
    open_files: dict[str, SafetensorsFile] = {}
    boundary = containment_root(path)
    for layer in spec.layers:
        by_key: dict[str, SafetensorsFile] = {}
        for name in files[layer]:
            if name not in open_files:
                open_files[name] = SafetensorsFile(_checked_file(path, name, boundary=boundary))
                _check_metadata(open_files[name], spec, layer, manifest)
            by_key.update(dict.fromkeys(open_files[name].keys(), open_files[name]))
        where = open_files[files[layer][0]]
        for key, dtype, shape in spec.layer_entries(layer):
            by_key[key] = _check_entry(by_key.get(key, where), key, dtype, shape)
        order = spec.quant_method.byte_order
        for expert in range(spec.num_experts):
            for proj in PROJECTIONS:
                n, k = spec.shard_shape(proj)
                for t in range(spec.threadpool_count):
                    pair = spec.pair_entries(layer, proj, expert, t)
                    arrays = [by_key[key] for key, _, _ in pair]
                    problem = order.pair_problem(pair, arrays, n, k)
                    if problem is not None:
                        raise PackedWeightsError(f"{where.path}: {problem}: the output is damaged; re-convert")
                    tensors[(layer, expert, proj, t)] = (arrays[0], arrays[1])
    return tensors


def _kt_folder_tensors(path: Path, spec: PackedSpec) -> dict:
    tensors = {}
    boundary = containment_root(path)
    scale_dtype = numpy_dtype(spec.quant_method.scale_dtype)
    for layer in spec.layers:
        for expert in range(spec.num_experts):
            for proj in PROJECTIONS:
                q, scales = spec.shard_sizes(proj)
                for t in range(spec.threadpool_count):
                    wpath, spath = kt_file_paths(path, layer, t, spec.method, proj, expert, q, scales)
                    arrays = []
                    for p, dtype, count in ((wpath, np.dtype(np.uint8), q), (spath, scale_dtype, scales)):
                        _checked_file(path, str(p.relative_to(path)), boundary=boundary,
                                      missing="; the output is incomplete: re-run the conversion")
                        if p.stat().st_size != count * dtype.itemsize:
                            raise PackedWeightsError(f"{p}: {p.stat().st_size} bytes, expected {count * dtype.itemsize}")
                        arrays.append(np.frombuffer(map_regular(p), dtype=dtype, count=count))
                    tensors[(layer, expert, proj, t)] = tuple(arrays)
    return tensors


def _layer_files(path: Path, m: Manifest) -> dict[int, list[str]]:
    files = {}
    for layer in m.layers:
        rec = m.completed.get(layer)
        if rec is None:
            raise PackedWeightsError(f"{path}: layer {layer} was never completed (the conversion was interrupted): "
                                     "re-run the same convert command to finish it")
        files[layer] = rec.files
    return files


def _check_layer_records(path: Path, m: Manifest, spec: PackedSpec) -> None:
    """The manifest's spec against each layer record's size and file list: cheap, before opening anything."""
    data = spec.layer_data_bytes()
    for layer in m.layers:
        rec = m.completed[layer]
        if m.layout == KT_FOLDERS:
            count = spec.num_experts * len(PROJECTIONS) * spec.threadpool_count * 2
            if len(rec.files) != count or rec.nbytes != data:
                raise PackedWeightsError(
                    f"{path}: layer {layer} lists {len(rec.files)} files of {rec.nbytes} bytes, but "
                    f"{spec.num_experts} experts x {spec.threadpool_count} NUMA shards of {spec.method} "
                    f"need {count} files of {data} bytes: the manifest does not match the output")
            if set(rec.files) != set(spec.kt_layer_files(layer)):
                raise PackedWeightsError(f"{path}: layer {layer} lists files other than the kt names for its "
                                         "dimensions: the manifest does not match the output")
        elif rec.nbytes < data + 8:
            raise PackedWeightsError(
                f"{path}: layer {layer} is {rec.nbytes} bytes in the manifest, but {spec.num_experts} experts "
                f"x {spec.threadpool_count} NUMA shards of {spec.method} need at least {data}: "
                "the manifest does not match the output")


AUTO_VERIFY_BYTES = 1 << 30  # verify=None hashes layers not hashed before up to this much (about a second)


def _verify_layer_files(path: Path, m: Manifest, verify: bool | None, state: Path | None = None) -> None:
    """Sizes always; sha256: every layer (verify=True), none (False), or (None) the layers not hashed
    before with these very files (format/verified.py, kept in `state`, the manifest's folder) when they are at
    most AUTO_VERIFY_BYTES."""
    state = state or path
    boundary = containment_root(path)
    layer_paths = {}
    for layer in m.layers:
        rec = m.completed[layer]
        paths = [_checked_file(path, f, f"{state / MANIFEST_FILE}: completed[{layer}].files",
                               f" although the manifest lists layer {layer} as complete", boundary) for f in rec.files]
        size = sum(p.stat().st_size for p in paths)
        if size != rec.nbytes:
            raise PackedWeightsError(f"{path}: layer {layer} files hold {size} bytes, the manifest says {rec.nbytes}: "
                        "the output is damaged; re-run the conversion command that wrote it (it converts this layer again)")
        layer_paths[layer] = paths
    if verify is False:
        return
    entries = read_verified(state)
    todo = [layer for layer in m.layers if verify or not is_verified(
        entries, layer, m.completed[layer].sha256, m.completed[layer].files, layer_paths[layer])]
    if verify is None and sum(m.completed[layer].nbytes for layer in todo) > AUTO_VERIFY_BYTES:
        return  # too much to hash on every load by default: sizes, headers and the manifest are checked
    for layer in todo:
        if tree_sha256_files(layer_paths[layer]) != m.completed[layer].sha256:
            raise PackedWeightsError(f"{path}: layer {layer} files do not match their sha256 in the manifest: the output is "
                        "damaged; re-run the conversion command that wrote it (it converts this layer again)")
    if todo:
        record_verified(state, entries, {layer: (m.completed[layer].sha256, m.completed[layer].files,
                                                layer_paths[layer]) for layer in todo})


def records_folder(path: Path) -> Path:
    """The folder holding the manifest of the output at `path`: path itself, or, when it holds none (an output
    made with --kt-sft-manifest: kt's SFT tree alone), the real directory beside it, PATH.kt-convert."""
    whole = Path(os.path.abspath(path))  # "." and ".." name no folder to put a suffix on
    state = state_dir(whole) if whole.name else whole
    if os.path.lexists(path / MANIFEST_FILE) or not os.path.lexists(state):
        return path
    try:
        mode = os.lstat(state).st_mode
    except OSError:
        return path
    if not stat.S_ISDIR(mode):  # a derived name: never read through a link planted there
        raise PackedWeightsError(f"{state} is not a real directory; the records of {path} are read from a folder of "
                                 "that name only: remove it, then re-run the same conversion to rewrite them")
    return state if os.path.lexists(state / MANIFEST_FILE) else path


def open_output(path: str | Path, verify: bool | None = None, *, cls: type[PackedOutput] = PackedOutput,
                stacklevel: int = 2) -> PackedOutput:
    """Opens a packed output directory (memory-mapped; nothing is copied) as a `cls`, checked against its
    manifest and, as `verify` asks, its digests (what each value means: kt_runtime.load_experts, the public
    face); an output without a manifest (kt-kernel's own) with parameters inferred from its tensors and a
    warning. stacklevel: of the warnings, as warnings.warn counts it from this function."""
    path = Path(path)
    if not path.is_dir():
        raise PackedWeightsError(f"{path}: not a directory of packed experts")
    state = records_folder(path)
    try:
        manifest = read_manifest(state)
    except ManifestError as e:
        raise PackedWeightsError(str(e)) from None
    kt_sft = manifest is not None and bool(manifest.options.get("kt_sft_manifest"))
    if kt_sft and state == path:
        raise PackedWeightsError(f"{path} holds the converter's records of a --kt-sft-manifest output, not its "
                                 f"weights: load {path.with_name(path.name.removesuffix(STATE_DIR_SUFFIX))}")
    if manifest is not None and state != path and not kt_sft:
        raise PackedWeightsError(f"{state / MANIFEST_FILE} does not describe a --kt-sft-manifest output, so it is "
                                 f"not the record of {path}: remove or rename {state}")
    try:
        if manifest is None:
            beside = f" (nor {state_dir(path)}/{MANIFEST_FILE})" if os.path.lexists(path / KT_SFT_MANIFEST_FILE) else ""
            warnings.warn(f"{path}: no kt_manifest.json{beside}; parameters are inferred from the tensors "
                          "and nothing can be checked against the source", stacklevel=stacklevel)
            spec, tensors = _infer_kt_output(path)
            return cls(path, spec, None, tensors)
        spec = manifest.spec
        if manifest.partial:
            missing = sorted(set(manifest.model_layers or []) - set(manifest.layers))
            warnings.warn(f"{path}: a partial output (converted with --layers): it holds MoE layers "
                          f"{list(manifest.layers)} of the model, not {missing}; a model needs every MoE layer, "
                          "so serve it only beside another source of those layers", stacklevel=stacklevel)
        files = _layer_files(path, manifest)
        _check_layer_records(path, manifest, spec)
        _verify_layer_files(path, manifest, verify, state)
        if manifest.layout == MERGED:
            tensors = _merged_tensors(path, spec, files, manifest)
        else:
            tensors = _kt_folder_tensors(path, spec)
        return cls(path, spec, manifest, tensors)
    except SafetensorsFormatError as e:
        raise PackedWeightsError(f"{e}") from None
    except OSError as e:
        raise PackedWeightsError(f"{e.filename or path}: cannot read ({e.strerror or e})") from None


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
            raise PackedWeightsError(f"{where}: a symlink to a missing file; delete it or copy the model's config.json") from None
        except (InputFileError, FieldError) as e:
            raise PackedWeightsError(f"{e}; fix or delete {where}") from None
        return top_k, "silu", limit
    return 2, "silu", None


def _infer_spec(path: Path, layers: set, experts: set, numas: set, gate_n: int, down_n: int, gate_bytes: int,
                counts: dict[int, int]):
    if not layers:
        raise PackedWeightsError(f"{path}: no packed expert tensors found (expected blk.L.ffn_*_exps.E.numa.T.* or _layer_L/ folders)")
    threadpool_count, num_experts = max(numas) + 1, max(experts) + 1
    expected = num_experts * len(PROJECTIONS) * threadpool_count * 2
    for layer in sorted(layers):  # before anything is sized from these numbers
        if counts.get(layer, 0) != expected:
            raise PackedWeightsError(f"{path}: layer {layer} holds {counts.get(layer, 0)} packed expert tensors, but experts "
                        f"0..{num_experts - 1} x 3 projections x {threadpool_count} NUMA shards x (weight, scale) are "
                        f"{expected}: experts or NUMA shards are missing; re-convert")
    inter, hidden = gate_n * threadpool_count, down_n
    per_byte = gate_n * hidden / gate_bytes if gate_bytes else 0
    # the methods whose keys and files these are (kt's tiled ones) whose weights take this many elements per byte
    fits = [m for m in METHODS.values() if m.byte_order is AMX_TILED and m.elems_per_byte == per_byte]
    if not fits or gate_n <= 0 or hidden <= 0:
        raise PackedWeightsError(f"{path}: cannot infer the method ({', '.join(sorted(METHODS))}) from a gate shard "
                                 f"of {gate_bytes} bytes for {gate_n}x{hidden}")
    method = fits[0]
    problem = alignment_problem(method, hidden, inter, threadpool_count)
    if problem is not None:
        raise PackedWeightsError(f"{path}: the inferred dimensions do not fit {method.name} ({problem}): not a "
                                 "kt-kernel output, or a damaged one")
    top_k, activation, limit = _config_facts(path)
    return PackedSpec(method.name, threadpool_count, hidden, inter, num_experts, min(top_k, num_experts),
                      tuple(sorted(layers)), activation, limit)


def _infer_kt_output(path: Path):
    shards = [path / n for n in names_ending(path, ".safetensors")]
    if shards:  # kt's loader takes the merged layout whenever a top-level *.safetensors exists
        files: dict[int, list[str]] = {}
        layers, experts, numas = set(), set(), set()
        counts: dict[int, int] = {}
        gate_n = down_n = gate_bytes = 0
        boundary = containment_root(path)
        for shard in shards:
            st = SafetensorsFile(_checked_file(path, shard.name, boundary=boundary))
            for key, info in st.tensors.items():
                k = parse_merged_key(key)
                if k is None:
                    continue
                layer, proj, expert, numa, part = k
                if info.dtype != ("F32" if part == "scale" else "I8") or len(info.shape) != 1:
                    raise PackedWeightsError(f"{shard}: tensor {key} is {info.dtype}{list(info.shape)}, expected a 1-D "
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
        spec = _infer_spec(path, layers, experts, numas, gate_n, down_n, gate_bytes, counts)
        return spec, _merged_tensors(path, spec, files)
    layers, experts, numas = set(), set(), set()
    counts = {}
    gate_n = down_n = gate_bytes = 0
    folders = [path / d / n for d in list_dir(path) if LAYER_DIR.match(d) and (path / d).is_dir()
               for n in list_dir(path / d)]
    for folder in folders:
        lm, nm = LAYER_DIR.match(folder.parent.name), NUMA_DIR.match(folder.name)
        if not lm or not nm or not folder.is_dir():
            continue  # e.g. _layer_5.tmp/ left by an interrupted run
        layer, numa = int(lm[1]), int(nm[1])
        for name in list_dir(folder):
            k = parse_kt_file_name(name)
            if k is None:
                continue
            layers.add(layer); numas.add(numa); experts.add(k.expert)
            counts[layer] = counts.get(layer, 0) + 1
            scale_items = k.nbytes // numpy_dtype(k.method.scale_dtype).itemsize
            if (k.proj, k.expert, numa) == ("gate", 0, 0):
                if k.part == "scale":
                    gate_n = scale_items
                else:
                    gate_bytes = k.nbytes
            if (k.proj, k.expert, numa, k.part) == ("down", 0, 0, "scale"):
                down_n = scale_items
    spec = _infer_spec(path, layers, experts, numas, gate_n, down_n, gate_bytes, counts)
    return spec, _kt_folder_tensors(path, spec)
