"""`convert-cpu-weights eval OUT --model SRC --text FILE`: KL divergence, top-1 agreement and perplexity of
the model with its routed experts served from OUT, against the original model (convert/eval/evaluate.py)."""
from __future__ import annotations

import click

from .json_out import to_stdout, write_json
from .option_types import PATH, REPORT, SOURCE
from .report_paths import check_report_paths


@click.command("eval", short_help="Score a converted model against the original: KL divergence, top-1, perplexity.",
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("output", type=PATH)
@click.option("--model", "-m", "model", required=True, type=SOURCE, metavar="SRC",
              help="The original checkpoint OUT was converted from, as transformers loads it (directory or hub id "
                   "in the local cache): config, tokenizer and weights.")
@click.option("--text", "-t", "text", required=True, type=PATH, metavar="FILE",
              help="UTF-8 text to score, teacher-forced (e.g. a wikitext test file).")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(8, 1 << 20),
              help="Tokens per window; each window scores its second half.")
@click.option("--max-tokens", type=click.IntRange(1), default=None, metavar="N",
              help="Score only the text's first N tokens (default: all, in whole windows).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs: cuda puts the non-expert weights on the GPU and serves the routed experts "
                   "with HybridMoE; cpu with the CPU engine alone.")
@click.option("--gpu-experts", type=click.IntRange(0), default=0, show_default=True, metavar="N",
              help="With --device cuda: routed experts per layer computed on the GPU (bf16, from OUT).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the model's weights and activations (bfloat16 halves the memory of the model).")
@click.option("--threads", type=click.IntRange(1, 4096), default=None,
              help="CPU engine threads (default: every core but one).")
@click.option("--no-per-layer", is_flag=True,
              help="Skip the per-layer error of the experts' output (it runs the original experts twice).")
@click.option("--json", "json_path", type=REPORT, default=None,
              help="Write the report as JSON here (-: standard output).")
@click.option("--progress/--no-progress", default=None, help="A progress bar (default: on a terminal).")
def eval_command(output, model, text, ctx, max_tokens, device, gpu_experts, dtype, threads, no_per_layer, json_path,
                 progress):
    """Measure a packed output against the original model: KL divergence, top-1 agreement, perplexity."""
    from ..eval.evaluate import evaluate

    check_report_paths({"--json": json_path}, inputs=(model,), outputs=(output,),
                       user_files={"the --text file": text})
    report = evaluate(output, model, text, ctx=ctx, max_tokens=max_tokens, device=device, gpu_experts=gpu_experts,
                      dtype=dtype, threads=threads, per_layer=not no_per_layer, progress=progress)
    click.echo(report.table(), err=to_stdout(json_path))
    if json_path is not None:
        write_json(json_path, report.to_dict(), indent=1)
