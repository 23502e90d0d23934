#!/usr/bin/env python3
"""Train the tiny Qwen3-MoE kept in tests/data/tiny-qwen3-moe: a model with learned weights, so that
`convert-cpu-weights eval` measures something real (KL divergence, top-1 agreement, perplexity) in tests
and docs/BENCHMARKS.md.

    python scripts/train_tiny_moe.py OUT [--steps 800] [--batch 16] [--lr 0.003] [--seed 0] [--threads 1]

The corpus is the CPython standard library's top-level modules (Lib/*.py of the running interpreter, on
every machine, offline), without the held-out modules of HELD_OUT, which are the evaluation text. A
byte-level BPE tokenizer (the `tokenizers` library, VOCAB entries) is trained on the same corpus. The model:
4 layers, every one MoE with 8 experts (top 2) of H = I = 128, so that every quant method's alignment holds
with --threadpool-count 1 (AMXINT4: 128 | H and 128 | I; AMXINT8: 64; RAWINT4 groups 32..128); about 2 M
parameters, saved in bf16 with the tokenizer and recipe.json (versions, corpus digest, losses). The defaults
are the recipe of the kept model (about 25 minutes on one core). Seeded: two runs with the same interpreter
(its Lib/), torch version and --threads write the same bytes. OUT must not exist; nothing else is written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

# Modules kept out of training: the evaluation text (present in CPython 3.10 to 3.14).
HELD_OUT = ("textwrap.py", "shlex.py", "fractions.py", "calendar.py", "difflib.py", "statistics.py")
VOCAB = 2048
EOS = "<|endoftext|>"
SEQ = 256


def model_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                num_experts=8, num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                tie_word_embeddings=True, max_position_embeddings=1024, rope_theta=10000.0,
                router_aux_loss_coef=0.01)


def corpus_files(stdlib: Path) -> list[Path]:
    return [p for p in sorted(stdlib.glob("*.py")) if p.name not in HELD_OUT]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output directory (must not exist)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16, help="sequences of 256 tokens per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.out.exists() or args.out.is_symlink():
        print(f"error: {args.out} exists; name a new directory", file=sys.stderr)
        return 2

    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    from kt_convert.kt_runtime.format.fsio import atomic_write_text
    from kt_convert.kt_runtime.format.input_files import read_capped

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = corpus_files(stdlib)
    texts = [read_capped(p, 16 << 20, what="standard-library module").decode("utf-8", errors="replace") for p in files]
    digest = hashlib.sha256()
    for p, t in zip(files, texts):
        digest.update(p.name.encode() + b"\0" + t.encode() + b"\0")
    tok = train_tokenizer(texts)
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t).ids + [eos]
    data = torch.tensor(ids, dtype=torch.long)
    n_seq = len(data) // SEQ
    seqs = data[: n_seq * SEQ].view(n_seq, SEQ)
    print(f"corpus: {len(files)} modules of {stdlib}, {len(data)} tokens, {n_seq} sequences of {SEQ}", flush=True)

    cfg = transformers.Qwen3MoeConfig(**model_config(tok.get_vocab_size()), output_router_logits=True,
                                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to a tenth
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n_seq, generator=gen)
    losses, start = [], time.time()
    for step in range(args.steps):
        pos = (step * args.batch) % n_seq
        idx = order[pos: pos + args.batch]
        if len(idx) < args.batch:
            order = torch.randperm(n_seq, generator=gen)
            idx = order[: args.batch]
        batch = seqs[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {losses[-1]:.3f} ({time.time() - start:.0f} s)", flush=True)

    model.eval()
    model.config.output_router_logits = False
    args.out.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=cfg.max_position_embeddings)
    fast.save_pretrained(args.out)
    recipe = {
        "command": f"python scripts/train_tiny_moe.py OUT --steps {args.steps} --batch {args.batch} --lr {args.lr} "
                   f"--seed {args.seed} --threads {args.threads}",
        "steps": args.steps, "batch": args.batch, "sequence": SEQ, "lr": args.lr, "seed": args.seed,
        "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "corpus": f"Lib/*.py of CPython {platform.python_version()}",
        "held_out": list(HELD_OUT), "corpus_sha256": digest.hexdigest(), "corpus_tokens": len(data),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_first": losses[0], "loss_last_25_mean": sum(losses[-25:]) / len(losses[-25:]),
        "train_seconds": round(time.time() - start, 1),
    }
    atomic_write_text(args.out / "recipe.json", json.dumps(recipe, indent=1) + "\n")
    print(json.dumps(recipe, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
