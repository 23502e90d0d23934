"""`verify`: how faithful a packed output is to its source, and whether it is intact.

    report = verify(OUT)                         # integrity: manifest, sizes, sha256 digests, tensors
    report = verify(OUT, source=SRC)             # + every layer, expert and projection against the source

With a source, each packed matrix (read through the format's reader, kt_runtime.format.reader, and
dequantized by quant.reference.dequantize_expert) is compared with the source matrix's own values
(quant.decoders.source_values: compressed-tensors INT4 as the exact products (u - 8) * scale, every other
format the bf16 matrix the packer quantizes): relative RMS error ||p - r|| / ||r||, max |p - r|, cosine
similarity and SNR (10 log10(||r||^2 / ||p - r||^2)), per tensor, per layer x projection and for the whole
model (from sums of squares, so the summaries are the norms of the concatenated tensors). The source is read
layer by layer in bounded batches (convert.layer_io.LayerReader, as the conversion reads it), and the tensors
of a batch are compared on every core.

torch is imported when verify compares with a source, never with the command line; the engine is never
imported (docs/ARCHITECTURE.md: the converter reads outputs through the format, not through the runtime).
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kt_convert.kt_runtime.format.names import PROJECTIONS

from .errors import UserError
from .units import size


@dataclass
class Sums:
    """Sums over the elements of one or more tensors, from which every error measure follows."""

    err2: float = 0.0  # sum (p - r)^2
    ref2: float = 0.0  # sum r^2
    packed2: float = 0.0  # sum p^2
    dot: float = 0.0  # sum p r
    max_abs: float = 0.0  # max |p - r|
    count: int = 0  # elements
    ref_max_abs: float = 0.0  # max |r|

    def add(self, o: "Sums") -> None:
        self.err2 += o.err2
        self.ref2 += o.ref2
        self.packed2 += o.packed2
        self.dot += o.dot
        self.max_abs = max(self.max_abs, o.max_abs)
        self.count += o.count
        self.ref_max_abs = max(self.ref_max_abs, o.ref_max_abs)

    @property
    def rel_rms(self) -> float:
        return math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else (0.0 if self.err2 == 0 else math.inf)

    @property
    def cosine(self) -> float:
        den = math.sqrt(self.packed2 * self.ref2)
        return self.dot / den if den > 0 else (1.0 if self.packed2 == self.ref2 else 0.0)

    @property
    def snr_db(self) -> float:
        if self.err2 == 0:
            return math.inf
        return 10 * math.log10(self.ref2 / self.err2) if self.ref2 > 0 else -math.inf

    def measures(self) -> dict:
        return {"rel_rms": self.rel_rms, "max_abs": self.max_abs, "cosine": self.cosine, "snr_db": self.snr_db}


ROW = 64  # elements summed in float32 before the float64 total: relative error ~1e-8 (1024: ~3e-7)
CHUNK = 1 << 18  # elements per step: few steps (each hands the GIL over twice), 1 MiB arrays


def tensor_sums(packed, ref) -> Sums:
    """Sums of one packed matrix against its reference (torch tensors or arrays of one shape), a chunk at a
    time: Σe², Σr², Σp² and Σpr summed in float32 over rows of ROW elements (einsum's one pass, no product
    array) and the row sums added in float64; max |e| and max |r| exact; e = p - r rounded to float32
    (relative error <= 2^-24 each, so identical matrices give exactly 0)."""
    import numpy as np
    import torch

    def flat(t):
        if isinstance(t, torch.Tensor):
            t = t.detach().to(torch.float32).numpy()
        return np.ascontiguousarray(t, dtype=np.float32).reshape(-1)

    p_all, r_all = flat(packed), flat(ref)
    out = Sums(count=p_all.size)
    f64 = np.float64
    e_buf = np.empty(CHUNK, dtype=np.float32)
    for i in range(0, p_all.size, CHUNK):
        p, r = p_all[i : i + CHUNK], r_all[i : i + CHUNK]
        e = np.subtract(p, r, out=e_buf[: p.size])
        rows = p.size // ROW * ROW  # whole rows as a 2-D einsum; the tail (< ROW) as one row
        for a, b, name in ((e, e, "err2"), (r, r, "ref2"), (p, p, "packed2"), (p, r, "dot")):
            total = np.einsum("ij,ij->i", a[:rows].reshape(-1, ROW), b[:rows].reshape(-1, ROW)).sum(dtype=f64)
            if rows < p.size:
                total += f64(np.einsum("i,i->", a[rows:], b[rows:]))
            setattr(out, name, getattr(out, name) + float(total))
        out.max_abs = max(out.max_abs, float(np.abs(e, out=e).max()))  # last use of e: in place
        out.ref_max_abs = max(out.ref_max_abs, float(np.abs(r, out=e).max()))  # e's buffer, free now
    return out


@dataclass
class TensorError:
    layer: int
    expert: int
    proj: str
    rel_rms: float
    max_abs: float
    cosine: float
    snr_db: float

    @property
    def name(self) -> str:
        return f"layer {self.layer} expert {self.expert} {self.proj}"


@dataclass
class VerifyReport:
    output: str
    method: str
    kt_method: str
    layers: list[int]
    num_experts: int
    integrity: dict  # what was checked without the source, and the bytes read
    source: str | None = None
    family: str | None = None
    input_type: str | None = None
    by_layer: dict[int, dict[str, Sums]] = field(default_factory=dict)  # layer -> proj -> sums
    tensors: list[TensorError] = field(default_factory=list)
    seconds: float = 0.0
    source_bytes: int = 0
    max_rel_error: float | None = None
    codes: int = 0  # group-wise INT4 outputs compared with the source: codes in the layers checked
    minus8_codes: int = 0  # of them, at the level -8 (convert.quant_notes)

    @property
    def model(self) -> Sums:
        total = Sums()
        for per_proj in self.by_layer.values():
            for s in per_proj.values():
                total.add(s)
        return total

    def by_projection(self) -> dict[str, Sums]:
        out = {p: Sums() for p in PROJECTIONS}
        for per_proj in self.by_layer.values():
            for p, s in per_proj.items():
                out[p].add(s)
        return out

    def worst(self, count: int = 10) -> list[TensorError]:
        return sorted(self.tensors, key=lambda t: (-t.rel_rms, t.layer, t.expert, t.proj))[:count]

    def exceeding(self) -> list[TensorError]:
        """Tensors whose relative RMS error is above max_rel_error (worst first)."""
        if self.max_rel_error is None:
            return []
        return [t for t in self.worst(len(self.tensors)) if not t.rel_rms <= self.max_rel_error]

    @property
    def ok(self) -> bool:
        return not self.exceeding()

    def to_dict(self) -> dict:
        d = {"output": self.output, "method": self.method, "kt_method": self.kt_method, "layers": self.layers,
             "num_experts": self.num_experts, "integrity": self.integrity, "source": self.source,
             "codes": self.codes, "minus8_codes": self.minus8_codes, "notes": self.notes()}
        if self.source is not None:
            d.update({
                "family": self.family, "input_type": self.input_type, "seconds": round(self.seconds, 3),
                "source_bytes": self.source_bytes,
                "source_gb_per_s": round(self.source_bytes / self.seconds / 1e9, 4) if self.seconds > 0 else 0.0,
                "model": _json_measures(self.model),
                "by_projection": {p: _json_measures(s) for p, s in self.by_projection().items()},
                "by_layer": [{"layer": layer, **{p: _json_measures(s) for p, s in per.items()}}
                             for layer, per in sorted(self.by_layer.items())],
                "worst": [_json_tensor(t) for t in self.worst()],
                "max_rel_error": self.max_rel_error,
                "exceeding": [_json_tensor(t) for t in self.exceeding()],
                "tensors": [_json_tensor(t) for t in self.tensors]})
        return d

    def notes(self) -> list[str]:
        """What kt-kernel computes wrongly with these codes (convert.quant_notes)."""
        from kt_convert.kt_runtime.format.methods import get_method

        from .quant_notes import GROUP_EFFECT, KT_GROUP_SIZE, minus8_line

        group = get_method(self.method).group_size
        lines = [minus8_line(self.minus8_codes, self.codes, "this output")]
        if group is not None and group != KT_GROUP_SIZE:
            lines.append("note: " + GROUP_EFFECT.format(group=group))
        return [line for line in lines if line]

    def table(self) -> str:
        """The terminal report."""
        lines = [f"{self.output}: {self.method} ({self.kt_method}), {len(self.layers)} layers x "
                 f"{self.num_experts} experts; integrity ok ({self.integrity['files']} files, "
                 f"{size(self.integrity['bytes'])}, digests {'checked' if self.integrity['digests'] else 'skipped'})"]
        lines += self.notes()
        if self.source is None:
            lines.append("no --source: weights not compared")
            return "\n".join(lines)
        lines.append(f"against {self.source} ({self.family}, {self.input_type}): relative RMS error, worst SNR")
        head = f"{'layer':>5}  " + "  ".join(f"{p + ' rel.rms':>13}" for p in PROJECTIONS) + f"  {'min SNR dB':>10}"
        lines += [head, "-" * len(head)]
        min_snr: dict[int, float] = {}
        for t in self.tensors:
            min_snr[t.layer] = min(min_snr.get(t.layer, math.inf), t.snr_db)
        for layer, per in sorted(self.by_layer.items()):
            cells = "  ".join(f"{100 * per[p].rel_rms:12.3f}%" for p in PROJECTIONS)
            lines.append(f"{layer:>5}  {cells}  {min_snr.get(layer, math.inf):10.2f}")
        lines.append("-" * len(head))
        per = self.by_projection()
        lines.append(f"{'all':>5}  " + "  ".join(f"{100 * per[p].rel_rms:12.3f}%" for p in PROJECTIONS)
                     + f"  {min(min_snr.values(), default=math.inf):10.2f}")
        m = self.model
        lines.append(f"model: rel RMS {100 * m.rel_rms:.3f}%, SNR {m.snr_db:.2f} dB, cosine {m.cosine:.6f}, "
                     f"max |error| {m.max_abs:.4g}; {size(self.source_bytes)} of source in {self.seconds:.1f} s")
        lines.append("worst: " + "; ".join(f"{t.name} {100 * t.rel_rms:.3f}% ({t.snr_db:.1f} dB)"
                                           for t in self.worst(3)))
        if self.max_rel_error is not None and self.ok:  # else the error names them
            lines.append(f"--max-rel-error {self.max_rel_error}: every tensor within")
        return "\n".join(lines)

    def exceeding_problem(self, shown: int = 10) -> str:
        """The error when tensors exceed --max-rel-error: how many, the worst `shown` named."""
        bad = self.exceeding()
        return (f"{len(bad)} tensors exceed --max-rel-error {self.max_rel_error}: "
                + ", ".join(f"{t.name} ({t.rel_rms:.4g})" for t in bad[:shown]) + (" ..." if len(bad) > shown else ""))


def _finite(x: float):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf") if not math.isnan(x) else "nan"


def _json_measures(s: Sums) -> dict:
    return {k: _finite(v) for k, v in s.measures().items()}


def _json_tensor(t: TensorError) -> dict:
    return {k: _finite(v) if isinstance(v, float) else v for k, v in asdict(t).items()}


def _integrity(weights, digests: bool) -> dict:
    m = weights.manifest
    files = sorted({f for rec in m.completed.values() for f in rec.files}) if m is not None else []
    kt_sft = m is not None and bool(m.options.get("kt_sft_manifest"))
    if kt_sft:
        _check_kt_sft(weights, digests)
    return {"manifest": m is not None, "complete": bool(m is not None and m.complete), "digests": digests and m is not None,
            "files": len(files), "bytes": sum(rec.nbytes for rec in m.completed.values()) if m is not None else 0,
            "partial": weights.partial, "kt_sft_manifest": kt_sft}


def _check_kt_sft(weights, digests: bool) -> None:
    """kt's SFT manifest and the tree beside it, as kt-kernel's validator sees them, against our records; with
    digests, the records' per-file sha256 against the layer digests the reader has checked."""
    from kt_convert.kt_runtime.format.kt_sft_manifest import record_digests_problem, weight_manifest_problem

    m = weights.manifest
    problem = weight_manifest_problem(weights.path, m.spec, m.completed)
    if problem is None and digests:
        problem = next(filter(None, (record_digests_problem(weights.path, m.completed[layer]) for layer in m.layers)),
                       None)
    if problem is not None:
        raise UserError(f"{weights.path} is not what kt-kernel's SFT path accepts: {problem}; re-run the same "
                        "convert command (it rewrites kt-weight-manifest.json and converts damaged layers again)")


def verify(output: str | Path, source: str | None = None, *, layers: list[int] | None = None, threads: int = 0,
           max_rel_error: float | None = None, digests: bool = True) -> VerifyReport:
    """Checks a packed output (UserError when it is damaged or does not match the source). threads: 0 = every
    core; layers: a subset of the output's layers (None: all)."""
    import warnings

    from kt_convert.kt_runtime.format.errors import PackedWeightsError
    from kt_convert.kt_runtime.format.reader import open_output

    if max_rel_error is not None and not (isinstance(max_rel_error, (int, float)) and max_rel_error >= 0):
        raise UserError(f"--max-rel-error must be a non-negative number, got {max_rel_error!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a partial output is fine to verify; it is said in the report
            weights = open_output(output, verify=digests)
    except PackedWeightsError as e:
        raise UserError(f"the output is damaged or incomplete: {e}") from None
    if weights.manifest is not None and not weights.manifest.complete:
        raise UserError(f"{output}: the conversion has not finished (kt_manifest.json is not complete): re-run the "
                        "same convert command, then verify")
    spec = weights.spec
    method = spec.quant_method
    chosen = list(spec.layers) if layers is None else list(layers)
    missing = [x for x in chosen if x not in spec.layers]
    if missing:
        raise UserError(f"--layers: {missing} are not in {output} (its layers: {list(spec.layers)})")
    report = VerifyReport(str(output), method.name, method.kt_method, chosen, spec.num_experts,
                          _integrity(weights, digests), max_rel_error=max_rel_error)
    if source is not None:
        _compare(report, weights, source, chosen, threads)
    return report


def beyond_quantization(s: Sums, method) -> float | None:
    """How many times the largest error of a tensor exceeds what `method` can produce on it
    (QuantMethod.max_error of its largest |weight|), when it does; None when it does not, or when the
    tensor holds NaN / Inf (packed as 0 with --allow-nonfinite: not comparable)."""
    if not (math.isfinite(s.max_abs) and math.isfinite(s.ref_max_abs)):
        return None
    bound = method.max_error(s.ref_max_abs)
    return None if s.max_abs <= bound else s.max_abs / bound


def not_the_source(output: str, source: str, why: str) -> UserError:
    return UserError(f"--source {source} is not the checkpoint {output} was converted from: {why}. Pass the "
                     "checkpoint it was converted from (kt_manifest.json records its path and files)")


def _check_identity(weights, ckpt, output: str, source: str) -> None:
    """The source files the output's manifest recorded against those of --source (names, sizes, headers)."""
    from .source import source_identity_problem

    recorded = weights.manifest.source if weights.manifest is not None else {}
    problem = source_identity_problem(recorded if isinstance(recorded, dict) else {}, ckpt.fingerprint())
    if problem is not None:
        where = recorded.get("path", "its source")
        raise not_the_source(output, source, f"{problem} ({output}/kt_manifest.json records {where})")


def _compare(report: VerifyReport, weights, source: str, layers: list[int], threads: int) -> None:
    import torch

    from kt_convert.quant.decoders import source_values
    from kt_convert.quant.reference import dequantize_expert

    from .layer_io import LayerReader
    from .pipeline import experts_per_batch
    from .plan import build_plan, layer_spec, read_source_matrix
    from .quant_notes import minus8_count
    from .source import open_checkpoint
    from .source_reader import default_read_threads

    spec = weights.spec
    method = spec.quant_method
    grouped = method.group_size is not None
    start = time.perf_counter()
    ckpt = open_checkpoint(source)
    try:
        try:  # one pool, every MoE layer: its dimensions and layers are compared below, in the output's words
            plan = build_plan(ckpt, method, 1, "merged")
        except UserError as e:
            raise UserError(f"--source {source}: {e}") from None
        recorded = (weights.manifest.source.get("family") if weights.manifest is not None else None)
        origin = f" ({report.output} was converted from a {recorded} checkpoint)" if recorded not in (None, plan.family) else ""
        if (plan.hidden_size, plan.moe_intermediate_size, plan.num_experts) != \
                (spec.hidden_size, spec.moe_intermediate_size, spec.num_experts):
            raise UserError(f"--source {source} ({plan.family}) has hidden {plan.hidden_size}, intermediate "
                            f"{plan.moe_intermediate_size}, {plan.num_experts} experts; {report.output} holds "
                            f"{spec.hidden_size}, {spec.moe_intermediate_size}, {spec.num_experts}: not its source"
                            + origin)
        source_layers = [lp.layer for lp in plan.layers]
        absent = [x for x in layers if x not in source_layers]
        if absent:
            raise UserError(f"--source {source} ({plan.family}) has no MoE {'layer' if len(absent) == 1 else 'layers'} "
                            f"{layer_spec(absent)} (its MoE layers: {layer_spec(source_layers)}), which {report.output} "
                            "holds: not its source" + origin)
        plan.layers = [lp for lp in plan.layers if lp.layer in layers]
        _check_identity(weights, ckpt, report.output, source)
        report.source, report.family, report.input_type = str(ckpt.root), plan.family, plan.input_type
        workers = threads or os.cpu_count() or 1
        reader = LayerReader(ckpt, plan, plan.layers, experts_per_batch(plan), threads=default_read_threads())
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # one tensor per core: the pool below runs them side by side
        try:
            # OpenMP's thread count is per calling thread: each worker sets its own
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kt-verify",
                                    initializer=torch.set_num_threads, initargs=(1,)) as pool:
                for lp in plan.layers:
                    per_proj = {p: Sums() for p in PROJECTIONS}
                    for experts, data in reader.batches(lp):
                        try:
                            def one(job):
                                expert, proj = job
                                ref = source_values(read_source_matrix(lp.experts[expert][proj], data))
                                sums = tensor_sums(dequantize_expert(weights, lp.layer, expert, proj), ref)
                                # a group-wise INT4 output: its codes at the level -8 (convert.quant_notes)
                                packed = weights.expert_tensors(lp.layer, expert, proj, 0)[0] if grouped else None
                                return expert, proj, sums, (minus8_count(packed), 2 * packed.size) if grouped else (0, 0)

                            jobs = [(e, p) for e in experts for p in PROJECTIONS]
                            for expert, proj, s, (minus8, codes) in pool.map(one, jobs):
                                report.minus8_codes += minus8
                                report.codes += codes
                                per_proj[proj].add(s)
                                report.tensors.append(TensorError(lp.layer, expert, proj, **s.measures()))
                                times = beyond_quantization(s, method)
                                if times is not None:
                                    raise not_the_source(report.output, source, (
                                        f"layer {lp.layer} expert {expert} {proj} is off by up to {s.max_abs:.4g}, "
                                        f"{times:.3g} times the most {method.name} can be off on weights of at most "
                                        f"{s.ref_max_abs:.4g}"))
                        finally:
                            data.release()
                    report.by_layer[lp.layer] = per_proj
                    report.source_bytes += lp.input_bytes
        finally:
            torch.set_num_threads(previous)
            reader.close()
    finally:
        ckpt.close()
    report.seconds = time.perf_counter() - start


# -- the picture: a self-contained HTML page with an SVG heat map of error by layer x projection -----------


def _color(value: float, lo: float, hi: float) -> str:
    """Green (lo) .. yellow .. red (hi) on a log scale."""
    if not math.isfinite(value) or value <= 0 or hi <= lo:
        t = 0.0 if value <= lo else 1.0
    else:
        t = (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo)) if lo > 0 else 1.0
    t = min(1.0, max(0.0, t))
    r = int(255 * min(1.0, 2 * t))
    g = int(255 * min(1.0, 2 * (1 - t)))
    return f"rgb({r},{g},60)"


def html_report(report: VerifyReport) -> str:
    from html import escape

    layers = sorted(report.by_layer)
    values = [report.by_layer[x][p].rel_rms for x in layers for p in PROJECTIONS]
    finite = [v for v in values if math.isfinite(v) and v > 0] or [1e-6]
    lo, hi = min(finite), max(finite)
    if hi <= lo:
        lo, hi = lo / 2, hi * 2
    cw, ch, left, top = 120, 18, 70, 40
    steps, step_h = 11, 16  # the legend: as tall as the map or taller (a few layers), never cut off
    width = left + cw * len(PROJECTIONS) + 170
    height = top + max(ch * len(layers), step_h * steps) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">']
    for j, p in enumerate(PROJECTIONS):
        parts.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 10}" text-anchor="middle">{p}</text>')
    for i, layer in enumerate(layers):
        y = top + i * ch
        parts.append(f'<text x="{left - 8}" y="{y + ch - 5}" text-anchor="end">{layer}</text>')
        for j, p in enumerate(PROJECTIONS):
            s = report.by_layer[layer][p]
            tip = (f"layer {layer} {p}: rel RMS {100 * s.rel_rms:.4f}%, SNR {s.snr_db:.2f} dB, cosine {s.cosine:.6f}, "
                   f"max |err| {s.max_abs:.4g}")
            parts.append(f'<rect x="{left + j * cw}" y="{y}" width="{cw - 2}" height="{ch - 2}" '
                         f'fill="{_color(s.rel_rms, lo, hi)}"><title>{escape(tip)}</title></rect>')
            parts.append(f'<text x="{left + j * cw + cw / 2}" y="{y + ch - 5}" text-anchor="middle">'
                         f'{100 * s.rel_rms:.3f}%</text>')
    lx = left + cw * len(PROJECTIONS) + 20
    for k in range(steps):
        v = lo * (hi / lo) ** (k / (steps - 1))
        parts.append(f'<rect x="{lx}" y="{top + k * step_h}" width="20" height="{step_h - 2}" fill="{_color(v, lo, hi)}"/>')
        parts.append(f'<text x="{lx + 26}" y="{top + k * step_h + 11}">{100 * v:.3f}%</text>')
    parts.append(f'<text x="{left}" y="{height - 8}">layer (rows) x projection: relative RMS error</text></svg>')
    m = report.model
    worst = "".join(f"<li>{escape(t.name)}: {100 * t.rel_rms:.4f}% ({t.snr_db:.2f} dB)</li>" for t in report.worst())
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>verify {escape(report.output)}</title>"
            "<style>body{font-family:sans-serif;margin:2em} td,th{padding:2px 8px}</style></head><body>"
            f"<h2>{escape(report.output)}</h2><p>{escape(report.method)} ({escape(report.kt_method)}) against "
            f"{escape(str(report.source))} ({escape(str(report.family))}, {escape(str(report.input_type))}): "
            f"relative RMS error {100 * m.rel_rms:.4f}%, SNR {m.snr_db:.2f} dB, cosine {m.cosine:.6f}, "
            f"max |error| {m.max_abs:.4g}.</p>{''.join(parts)}<h3>Worst tensors</h3><ol>{worst}</ol></body></html>\n")
