"""The report of one output of a run (convert.pipeline.convert / convert_outputs): what was converted, resumed
and skipped, the bytes and the seconds, as a summary line, a warning about packed NaN/Inf values, or JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kt_convert.kt_runtime.format.names import KT_SFT_MANIFEST_FILE

from .units import plural, rate, size


@dataclass
class ConversionReport:
    output: str
    family: str
    input_type: str
    method: str
    kt_method: str
    threadpool_count: int
    device: str
    layers: int
    layers_converted: int
    layers_resumed: int
    experts_per_layer: int
    mtp_tensors_skipped: int
    input_bytes: int  # source expert bytes converted in this run
    output_bytes: int  # packed bytes written in this run
    seconds: float
    nonfinite: dict[str, int] = field(default_factory=dict)
    partial: bool = False  # --layers left out MoE layers of the model
    model_layers: int = 0  # MoE layers of the whole model
    startup_seconds: float = 0.0  # finding the device (--device auto), not counted in `seconds`
    shard: str = ""  # --shard I/N: this process converted shard I's layers only (I from 1)
    layers_held: list[int] = field(default_factory=list)  # of our shard, being converted by other processes
    complete: bool = True  # the output is complete (a --shard run: once every shard's layers are)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (convert.timings.STAGES)
    records: str = ""  # --kt-sft-manifest: the folder of this converter's manifest and records (OUT.kt-convert)
    device_reason: str = ""  # why --device auto chose the device ("" when it was given)

    @property
    def input_gb_per_s(self) -> float:
        return self.input_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_gb_per_s"] = round(self.input_gb_per_s, 4)
        return d

    def nonfinite_warning(self, shown: int = 10) -> str:
        """The NaN/Inf source values the output holds as 0 (--allow-nonfinite), the first `shown` tensors named."""
        if not self.nonfinite:
            return ""
        items = list(self.nonfinite.items())
        lines = [f"warning: {sum(self.nonfinite.values())} NaN/Inf source values packed as 0 (--allow-nonfinite) in "
                 f"{plural(len(items), 'tensor')}; kt_manifest.json keeps the list:"]
        lines += [f"  {key}: {n}" for key, n in items[:shown]]
        if len(items) > shown:
            lines.append(f"  ... and {len(items) - shown} more tensors (every one in kt_manifest.json and the --json "
                         "report)")
        return "\n".join(lines)

    def summary(self) -> str:
        tail = ((f"\nthis output is partial: {self.layers} of the model's {self.model_layers} MoE layers "
                 "(--layers); kt_manifest.json says so" if self.partial else "")
                + (f"\nshard {self.shard}: layers {', '.join(map(str, self.layers_held))} of this shard are being "
                   "converted by other processes" if self.layers_held else "")
                + ("\nnot complete yet: other shards' layers are missing; the last shard to finish (or "
                   f"`convert-cpu-weights finalize {self.output}`) completes it" if not self.complete else "")
                + (f"\nkt-kernel SFT: kt_weight_path {self.output} ({KT_SFT_MANIFEST_FILE}); this converter's "
                   f"manifest and records: {self.records}" if self.records and self.complete else ""))
        if not self.layers_converted:
            return (f"nothing to convert: all {plural(self.layers_resumed, 'layer')} were converted by an earlier run "
                    f"-> {self.output}" + tail)
        return (f"{plural(self.layers_converted, 'layer')} converted, {self.layers_resumed} already done, "
                f"{plural(self.experts_per_layer, 'expert')} each ({self.method}, threadpool count {self.threadpool_count}, "
                f"{self.device}): {size(self.input_bytes)} in, {size(self.output_bytes)} out, "
                f"{self.seconds:.1f} s, {rate(self.input_bytes, self.seconds)} -> {self.output}"
                + (f" (and {self.startup_seconds:.1f} s finding the device)" if self.startup_seconds >= 0.5 else "")
                + (f"\nGPU start-up {self.timings['device_init_s']:.1f} s on a background thread (the CPU packed "
                   f"{self.timings.get('cpu_batches_while_device_starts', 0):.0f} batches meanwhile; main thread waited "
                   f"{self.timings.get('device_init_wait_s', 0):.1f} s)" if "device_init_s" in self.timings else "")
                + tail)
