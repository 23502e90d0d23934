"""`eval`: what a packed output does to the model's predictions, against the original weights.

    report = evaluate(OUT, model=SRC, text=FILE, ctx=512)

The original checkpoint SRC runs through transformers, teacher-forced over FILE's tokens in windows of
`ctx` tokens (llama-perplexity's scheme: each window scores its second half, every prediction seeing at
least ctx/2 tokens of context). Each window runs twice on the one model: with the original routed-experts
modules (the reference), then with kt_runtime's hybrid experts over OUT in their place (CPU experts; on a
GPU, `gpu_experts` of them per layer on the GPU), swapped by kt_runtime.integrations.swap_experts. So the
non-expert weights are held once, the original experts once (in the model) and the packed experts are
mapped from OUT, not copied. convert.eval.divergence turns the two sets of logits into KL divergence, top-1
agreement and both perplexities; per MoE layer, the relative error of the packed experts' output against
the original experts on the same input, and how often both passes route a token to the same experts.

transformers, torch and the engine are imported when eval runs, never with the command line.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kt_convert.kt_runtime.format import files
from kt_convert.kt_runtime.format.errors import InputFileError

from ..errors import UserError

TEXT_MAX_BYTES = 256 << 20
MIN_CTX = 8
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
# Files a transformers tokenizer is built from (any one of them, with tokenizer_config.json where it has one)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


@dataclass
class EvalReport:
    output: str
    model: str
    text: str
    method: str
    device: str
    gpu_experts: int
    dtype: str
    ctx: int
    windows: int
    text_tokens: int  # tokens of the text (before --max-tokens)
    summary: dict  # convert.eval.divergence.Scores.summary()
    layers: list = field(default_factory=list)  # convert.eval.windows.LayerStats per MoE layer
    notes: list[str] = field(default_factory=list)  # what loading OUT warned about
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Plain JSON values (a measure that does not exist, e.g. a standard error of one value, is null)."""
        d = asdict(self)
        d["layers"] = [{"layer": s.layer, "expert_output_rel_error": s.rel_error,
                        "route_agreement": s.route_agreement} for s in self.layers]
        return _finite(d)

    def table(self) -> str:
        s = self.summary
        pct = "  ".join(f"{k} {v:.4g}" for k, v in s["kld_percentiles"].items())
        where = self.device + (f", {self.gpu_experts} GPU experts per layer" if self.device.startswith("cuda") else "")
        lines = [
            f"{self.output} ({self.method}) against {self.model} on {self.text}",
            f"{self.windows} windows of {self.ctx} tokens, {s['positions']} predictions scored, {self.dtype} on "
            f"{where}, {self.seconds:.1f} s",
            f"KL divergence    mean {s['kld_mean']:.5g} ± {s['kld_mean_stderr']:.2g}  {pct}  max {s['kld_max']:.4g}",
            f"top-1 agreement  {100 * s['top1_agreement']:.2f} % ± {100 * s['top1_agreement_stderr']:.2f}",
            f"perplexity       original {s['perplexity_reference']:.4f}  packed {s['perplexity_candidate']:.4f}  "
            f"ln(ratio) {s['ln_perplexity_ratio']:.5f} ± {s['ln_perplexity_ratio_stderr']:.2g}",
        ]
        if self.layers:
            lines.append("layer  expert output rel. error  same experts chosen")
            lines += [f"{x.layer:5d}  {'-' if x.rel_error is None else f'{x.rel_error:.4g}':>24s}  "
                      f"{100 * x.route_agreement:17.2f} %" for x in self.layers]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def read_text(path: str | Path) -> str:
    """The evaluation text: a regular UTF-8 file of at most TEXT_MAX_BYTES (a user file)."""
    path = Path(path)
    try:
        data = files.read_file(path, files.USER, what="evaluation text", max_bytes=TEXT_MAX_BYTES)
    except FileNotFoundError:
        raise UserError(f"--text {path}: no such file") from None
    except InputFileError as e:
        raise UserError(f"--text {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--text {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def windows_of(ids: list[int], ctx: int, max_tokens: int | None, bos: int | None, where: str) -> list[list[int]]:
    """The text's tokens (the first max_tokens) in whole windows of ctx tokens, the first of each replaced by
    the BOS token where the tokenizer starts texts with one (as llama-perplexity does); the tail is dropped."""
    usable = ids if max_tokens is None else ids[:max_tokens]
    n = len(usable) // ctx
    if n == 0:
        limit = f" (--max-tokens {max_tokens})" if max_tokens is not None and max_tokens < len(ids) else ""
        raise UserError(f"{where} has {len(ids)} tokens{limit}, fewer than one window of --ctx {ctx}: give a longer "
                        f"text or a smaller --ctx (at least {MIN_CTX})")
    out = [list(usable[i * ctx:(i + 1) * ctx]) for i in range(n)]
    if bos is not None:
        for w in out:
            w[0] = bos
    return out


def _bos_prefix(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one before a text by itself, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    return bos if len(full) > len(plain) and full[0] == bos else None


def _model_dir(model: str):
    """SRC as a checkpoint directory whose config.json, tokenizer and weights files the converter's checks
    accept (contained, regular, sane sizes); returns (directory, config dict)."""
    from ..source import open_checkpoint

    if Path(model).suffix == ".safetensors" and Path(model).is_file():
        raise UserError(f"--model {model}: eval needs the model's directory (config.json, tokenizer and weights), "
                        "not one .safetensors file")
    ckpt = open_checkpoint(model)
    root, config = ckpt.root, ckpt.config
    ckpt.close()
    if not any(os.path.lexists(root / name) for name in TOKENIZER_FILES):
        raise UserError(f"--model {root} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the original model's "
                        "tokenizer files into it")
    return root, config


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("eval runs the model through transformers, which is not installed: "
                        "pip install 'transformers>=5.23'") from None
    return transformers


def _check_family(transformers, root: Path, config: dict) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"{root / 'config.json'} has no model_type: transformers cannot tell which model it is")
    if model_type not in CONFIG_MAPPING:
        remote = " (its config names remote code, auto_map, which eval does not run)" if "auto_map" in config else ""
        raise UserError(f"{root / 'config.json'}: model_type {model_type!r} is not a model transformers "
                        f"{transformers.__version__} runs{remote}; eval runs the original model through transformers: "
                        "use a transformers version that has it")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{root / 'config.json'}: transformers {transformers.__version__} has no causal language "
                        f"model for model_type {model_type!r}; eval needs one")


def _resolve_device(device: str):
    import torch

    if device not in DEVICES:
        raise UserError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(device)


def evaluate(output: str | Path, model: str, text: str | Path, *, ctx: int = 512, max_tokens: int | None = None,
             device: str = "auto", gpu_experts: int = 0, dtype: str = "float32", threads: int | None = None,
             per_layer: bool = True, progress: bool | None = None, stream=None) -> EvalReport:
    """KL divergence, top-1 agreement and perplexities of SRC (`model`) with its routed experts served from the
    packed output against SRC itself, over `text`. UserError (exit 2) naming the input for what the user can fix:
    transformers lacking the family, no tokenizer, a text shorter than one window, an OUT that is not SRC's."""
    start = time.perf_counter()
    if ctx < MIN_CTX:
        raise UserError(f"--ctx {ctx}: a window needs at least {MIN_CTX} tokens")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: expected a positive number of tokens")
    if gpu_experts < 0:
        raise UserError(f"--gpu-experts {gpu_experts}: expected 0 or more")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: expected 1 or more")
    body = read_text(text)
    transformers = _transformers()
    root, config = _model_dir(model)
    _check_family(transformers, root, config)
    dev = _resolve_device(device)
    if gpu_experts and dev.type != "cuda":
        raise UserError(f"--gpu-experts {gpu_experts} needs --device cuda (on the CPU every expert runs in the CPU "
                        "engine)")
    import torch

    from kt_convert import kt_runtime

    with warnings.catch_warnings(record=True) as caught:  # said in the report (e.g. a kt output, no manifest)
        warnings.simplefilter("always")
        packed = kt_runtime.load_experts(output)  # a PackedFormatError is a FixableError: exit 2 as it is
    net_config = _load(lambda: transformers.AutoConfig.from_pretrained(root, local_files_only=True),
                       f"the config of {root}")
    limit = getattr(net_config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and ctx > limit:
        raise UserError(f"--ctx {ctx} is longer than the model's max_position_embeddings {limit}")
    tokenizer = _load(lambda: transformers.AutoTokenizer.from_pretrained(root, local_files_only=True),
                      f"the tokenizer of {root}")
    ids = tokenizer(body, add_special_tokens=False, verbose=False)["input_ids"]
    windows = windows_of(ids, ctx, max_tokens, _bos_prefix(tokenizer), f"--text {text}")
    net = _load(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        root, config=net_config, dtype=getattr(torch, dtype), local_files_only=True), f"the model {root}")
    net.eval().to(dev)
    originals, candidates = _expert_modules(net, packed, root, output, dev, gpu_experts, threads)
    from .windows import compare_on_windows

    scores, layers = compare_on_windows(net, windows, originals, candidates, per_layer=per_layer,
                                        progress=progress, stream=stream)
    return EvalReport(output=str(output), model=str(root), text=str(text), method=packed.method, device=str(dev),
                      gpu_experts=gpu_experts if dev.type == "cuda" else 0, dtype=dtype, ctx=ctx,
                      windows=len(windows), text_tokens=len(ids), summary=scores.summary(),
                      layers=layers, notes=[str(w.message) for w in caught], seconds=time.perf_counter() - start)


def _load(make, what: str):
    """transformers' loading, whose errors about the files become exit 2 naming them."""
    try:
        return make()
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:  # ImportError: e.g. FP8 needs accelerate
        raise UserError(f"transformers could not load {what}: {str(e).strip().splitlines()[0] if str(e) else e!r}"
                        ) from None


def _expert_modules(net, packed, root: Path, output, dev, gpu_experts: int, threads: int | None):
    """({name: original experts module}, {name: hybrid experts over OUT}), after checking that OUT holds this
    model's experts: the same layers and dims, and in every layer expert 0 close to the model's own."""
    from kt_convert.kt_runtime.integrations import expert_difference, find_expert_modules, hybrid_experts
    from kt_convert.kt_runtime.integrations.transformers import MAX_EXPERT_REL_DIFF

    found = find_expert_modules(net)
    if not found:
        raise UserError(f"{type(net).__name__} ({root}) has no routed-experts modules kt_runtime can serve "
                        "('...layers.L...experts' with gate_up_proj / down_proj): eval supports the MoE families of "
                        "kt_runtime.inject")
    try:
        built = hybrid_experts(net, packed, num_gpu_experts=gpu_experts, device=dev, num_threads=threads,
                               check_values=False)
    except ValueError as e:
        raise UserError(f"{output} does not match --model {root}: {e}") from None
    for layer, (_, module) in found.items():
        rel = expert_difference(packed, layer, module)
        if rel is not None and not rel <= MAX_EXPERT_REL_DIFF:
            raise UserError(f"{output} does not match --model {root}: layer {layer} expert 0's gate/up weights differ "
                            f"from the model's by {rel:.2f} (relative; quantization alone stays below 0.2): it was "
                            "converted from another model; convert this one, or pass the model it came from")
    return ({name: module for name, module in found.values()},
            {found[layer][0]: module for layer, module in built.items()})
