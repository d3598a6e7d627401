"""Engine benchmark: how close the native backend gets to the memory floor.

Measures, for each weight format (float32, bfloat16, int8), on the default
model (SmolLM2-135M-Instruct):

1. forward time of 1, 4, 8, 16, 32, 64 new tokens after a 512-token prompt;
2. a plain decode step vs the bare matrix products of the same step (same
   weights, same kernels, same run) vs the memory-read floor (bytes of
   weights / measured read bandwidth);
3. plain greedy tokens/s of paradecode vs transformers' ``model.generate``
   (greedy, same prompts, same dtype, interleaved, chat prompts, 64 tokens);
4. perplexity of each format on ``paradecode/data/ppl_text.txt``;
5. peak resident memory (RSS) of a process that loads the model and decodes.

Every comparison is interleaved in one process (A, B, A, B, ...) and reported
as a median after warm-up: the machine is shared, so absolute numbers drift
with the load of the moment; ratios within one run are what to read.

    python benchmarks/engine.py --threads 1 --out benchmarks/engine-results.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import torch

FORMATS = ("float32", "bfloat16", "int8")
BLOCKS = (1, 4, 8, 16, 32, 64)
PROMPTS = ["Name three colours.", "Give me three tips for sleeping better.",
           "Explain what a black hole is in two sentences."]


def median_ms(xs: list[float], skip: int = 1) -> float:
    return statistics.median(xs[skip:] if len(xs) > skip else xs) * 1e3


def machine() -> dict:
    """The benchmark's machine description, plus what matters for this one (BF16 support, load)."""
    import os

    from paradecode.bench.report import machine_info

    info = machine_info()
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return {"cpu": info["cpu"], "cores": info["cores"], "avx512_bf16": "avx512_bf16" in flags,
            "threads": info["torch_threads"], "torch": info["versions"]["torch"],
            "transformers": info["versions"]["transformers"], "python": platform.python_version(),
            "load_avg": os.getloadavg()}


def read_bandwidth(mb: int = 256, reps: int = 7) -> float:
    """GB/s of a streaming read (sum of a float32 buffer much larger than the caches)."""
    buf = torch.ones(mb * (1 << 20) // 4)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        ts.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(ts[1:]) / 1e9


def load_all(formats):
    from paradecode.models.loading import resolve_model_path, read_config, _read_weights
    from paradecode.models.native import NativeLlama
    from paradecode.tokenizer import load_tokenizer

    path = resolve_model_path(None)
    cfg, w, tok = read_config(path), _read_weights(path), load_tokenizer(path)
    models = {f: NativeLlama(cfg, w, dtype=f, tokenizer=tok, name="SmolLM2-135M-Instruct") for f in formats}
    return models, path


def bench_blocks(models, reps: int, prompt_len: int = 512) -> dict:
    """Forward time of T new tokens after a cached prompt, per format (interleaved)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, prompt_len + max(BLOCKS)), generator=g)
    caches = {}
    for f, m in models.items():
        c = m.new_cache(1, prompt_len + max(BLOCKS))
        m.forward(c, ids[:, :prompt_len], logits_for=torch.tensor([prompt_len - 1]))
        caches[f] = c
    times = {(f, T): [] for f in models for T in BLOCKS}
    for _ in range(reps + 1):
        for f, m in models.items():
            for T in BLOCKS:
                c = caches[f]
                c.rollback(prompt_len)
                t = time.perf_counter()
                m.forward(c, ids[:, prompt_len:prompt_len + T])
                times[(f, T)].append(time.perf_counter() - t)
    return {f: {T: median_ms(times[(f, T)]) for T in BLOCKS} for f in models}


def bench_step_vs_matmuls(models, reps: int, bandwidth: float, prompt_len: int = 512) -> dict:
    """One decode step vs its bare projections (same kernels, same padding) vs bytes/bandwidth."""
    ids = torch.randint(100, 40000, (1, prompt_len + 1), generator=torch.Generator().manual_seed(1))
    caches = {}
    for f, m in models.items():
        c = m.new_cache(1, prompt_len + 1)
        m.forward(c, ids[:, :prompt_len], logits_for=torch.tensor([prompt_len - 1]))
        caches[f] = c
    step = {f: [] for f in models}
    bare = {f: [] for f in models}
    for _ in range(reps + 1):
        for f, m in models.items():
            xs = {k: torch.randn(1, 1, k).to(m.dtype) for k in (m.shape.hidden, m.shape.heads * m.shape.head_dim,
                                                              m.shape.intermediate)}
            mats = m.matrices()
            t = time.perf_counter()
            with torch.inference_mode():
                for w in mats:
                    m._linear(xs[w.shape[1]], w)
            bare[f].append(time.perf_counter() - t)
            c = caches[f]
            c.rollback(prompt_len)
            t = time.perf_counter()
            m.forward(c, ids[:, prompt_len:])
            step[f].append(time.perf_counter() - t)
    out = {}
    for f, m in models.items():
        wb = m.weight_bytes()
        out[f] = {"step_ms": median_ms(step[f]), "matmuls_ms": median_ms(bare[f]), "weight_MB": wb / 1e6,
                  "floor_ms": wb / (bandwidth * 1e9) * 1e3}
    return out


def bench_generate(models, formats, path, reps: int, new_tokens: int = 64, n_prompts: int = len(PROMPTS)) -> dict:
    """Plain greedy decoding: paradecode vs transformers' generate, same dtype, interleaved."""
    from transformers import AutoModelForCausalLM

    from paradecode.api import encode_prompt, generate

    any_model = next(iter(models.values()))
    prompt_ids = [encode_prompt(any_model, p, chat=True) for p in PROMPTS[:n_prompts]]
    hf = {}
    for f in formats:
        if f in ("float32", "bfloat16"):
            hf[f] = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, f)).eval()
    times = {(k, f): [] for f in formats for k in ("paradecode", "transformers") if k == "paradecode" or f in hf}
    same = {f: [] for f in hf}
    for rep in range(reps + 1):
        for ids in prompt_ids:
            for f in formats:
                t = time.perf_counter()
                ours = generate(models[f], ids, max_new_tokens=new_tokens, ignore_eos=True).token_ids
                times[("paradecode", f)].append(new_tokens / (time.perf_counter() - t))
                if f in hf:
                    x = torch.tensor([ids])
                    t = time.perf_counter()
                    with torch.inference_mode():
                        y = hf[f].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
                    times[("transformers", f)].append(new_tokens / (time.perf_counter() - t))
                    if rep == 0:
                        theirs = y[0, len(ids):].tolist()
                        n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
                        same[f].append(n)
    skip = len(prompt_ids)  # first round is warm-up
    tps = {k: statistics.median(v[skip:]) for k, v in times.items()}
    return {"tokens_per_s": {f"{k}/{f}": v for (k, f), v in tps.items()},
            "identical_prefix": {f: v for f, v in same.items()}, "new_tokens": new_tokens}


def perplexity(models) -> dict:
    text = resources.files("paradecode").joinpath("data/ppl_text.txt").read_text()
    out = {}
    for f, m in models.items():
        ids = torch.tensor([m.tokenizer.encode(text)])
        logits = m.forward(m.new_cache(1, ids.shape[1]), ids)                    # (1, n, V)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        out[f] = {"ppl": math.exp(float(nll)), "tokens": int(ids.shape[1])}
    return out


def peak_rss(fmt: str, backend: str, threads: int) -> float:
    """Peak RSS (MB, VmHWM) of a fresh process that loads the model and decodes 32 tokens."""
    code = (f"import torch, resource; torch.set_num_threads({threads});"
            f"from paradecode import load_model, generate;"
            f"m = load_model(backend={backend!r}, dtype={fmt!r});"
            f"generate(m, 'Name three colours.', chat=True, max_new_tokens=32, ignore_eos=True);"
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the parent
            f"print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def report(res: dict, command: str) -> str:
    m = res["machine"]
    L = ["# Engine benchmark results", "",
         f"Command: `{command}`", "",
         f"Machine: {m['cpu']}, {m['cores']} cores (AVX-512 BF16: {m['avx512_bf16']}), shared with other "
         f"jobs (load average at start {m['load_avg'][0]:.1f}); torch threads {m['threads']}; "
         f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}.",
         f"Measured streaming read bandwidth: {res['bandwidth_GBps']:.1f} GB/s"
         + (f" (the memory floor below uses {res['bandwidth_GBps_step']:.1f} GB/s, measured in the run that "
            f"timed the decode step)" if "bandwidth_GBps_step" in res else "") + ".", "",
         "Caveat: the machine is shared by several engineers; absolute times drift with their load. "
         "All comparisons were interleaved in one process and are medians after warm-up — read the ratios.", ""]
    if "blocks" in res:
        L += ["## Forward time after a 512-token prompt (ms, median)", "",
              "| format | " + " | ".join(f"T={T}" for T in BLOCKS) + " | T=16 / T=1 |",
              "|---|" + "---|" * (len(BLOCKS) + 1)]
        for f, row in res["blocks"].items():
            L.append(f"| {f} | " + " | ".join(f"{row[T]:.1f}" for T in BLOCKS) + f" | {row[16] / row[1]:.2f}x |")
        L.append("")
    if "step" in res:
        L += ["## Decode step vs bare matrix products vs memory floor (1 token, 512-token cache)", "",
              "| format | weights read (MB) | floor (ms) | bare products (ms) | full step (ms) | step / products | step / floor |",
              "|---|---|---|---|---|---|---|"]
        for f, r in res["step"].items():
            L.append(f"| {f} | {r['weight_MB']:.0f} | {r['floor_ms']:.1f} | {r['matmuls_ms']:.1f} | "
                     f"{r['step_ms']:.1f} | {r['step_ms'] / r['matmuls_ms']:.2f}x | {r['step_ms'] / r['floor_ms']:.2f}x |")
        L.append("")
    if "generate" in res:
        g = res["generate"]
        tps = g["tokens_per_s"]
        L += [f"## Plain greedy decoding, {g['new_tokens']} new tokens, chat prompts (tokens/s, median)", "",
              "| format | paradecode | transformers generate | speedup |", "|---|---|---|---|"]
        for f in res["formats"]:
            ours = tps.get(f"paradecode/{f}")
            theirs = tps.get(f"transformers/{f}")
            if theirs is None:
                base = tps.get("transformers/bfloat16")
                L.append(f"| {f} | {ours:.1f} | — (bfloat16: {base:.1f}) | {ours / base:.2f}x vs bfloat16 |"
                         if base else f"| {f} | {ours:.1f} | — | — |")
            else:
                L.append(f"| {f} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
        L += ["", "Tokens identical to transformers' output before the first difference (per prompt, of "
              f"{g['new_tokens']}): " + ", ".join(f"{f}: {v}" for f, v in g["identical_prefix"].items()), ""]
    if "ppl" in res:
        ref = res["ppl"].get("float32", {}).get("ppl")
        L += ["## Perplexity on `paradecode/data/ppl_text.txt`", "",
              "| format | tokens | perplexity | vs float32 |", "|---|---|---|---|"]
        for f, r in res["ppl"].items():
            rel = f"{(r['ppl'] / ref - 1) * 100:+.2f}%" if ref else "—"
            L.append(f"| {f} | {r['tokens']} | {r['ppl']:.3f} | {rel} |")
        L.append("")
    if "rss" in res:
        L += ["## Peak resident memory (load + 32-token decode, fresh process)", "",
              "| backend / format | peak RSS (MB) |", "|---|---|"]
        L += [f"| {k} | {v:.0f} |" for k, v in res["rss"].items()]
        L.append("")
    return "\n".join(L)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up round")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: blocks,step,generate,ppl,rss")
    ap.add_argument("--gen-reps", type=int, default=None, help="timed rounds of the generate comparison "
                    "(default reps // 2)")
    ap.add_argument("--gen-prompts", type=int, default=len(PROMPTS), help="how many chat prompts to generate for")
    ap.add_argument("--merge", type=Path, default=None,
                    help="JSON of an earlier (partial) run whose sections fill the skipped ones")
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = [f for f in args.formats.split(",") if f]
    skip = set(args.skip.split(","))
    res: dict = {"formats": formats, "machine": machine()}
    res["bandwidth_GBps"] = read_bandwidth()
    print(f"read bandwidth {res['bandwidth_GBps']:.1f} GB/s", flush=True)
    models, path = load_all(formats)
    if "blocks" not in skip:
        res["blocks"] = bench_blocks(models, args.reps)
        print("blocks", json.dumps(res["blocks"], indent=1), flush=True)
    if "step" not in skip:
        res["step"] = bench_step_vs_matmuls(models, args.reps, res["bandwidth_GBps"])
        print("step", json.dumps(res["step"], indent=1), flush=True)
    if "ppl" not in skip:
        res["ppl"] = perplexity(models)
        print("ppl", res["ppl"], flush=True)
    if "generate" not in skip:
        res["generate"] = bench_generate(models, formats, path, args.gen_reps or max(1, args.reps // 2),
                                         n_prompts=args.gen_prompts)
        print("generate", json.dumps(res["generate"], indent=1), flush=True)
    del models
    if "rss" not in skip:
        res["rss"] = {f"native/{f}": peak_rss(f, "native", args.threads) for f in formats}
        for f in formats:
            if f != "int8":
                res["rss"][f"transformers/{f}"] = peak_rss(f, "transformers", args.threads)
        print("rss", res["rss"], flush=True)
    res["machine"]["ru_maxrss_MB_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        for key, val in earlier.items():
            if key in ("blocks",):
                val = {f: {int(T): v for T, v in row.items()} for f, row in val.items()}
            if key not in res or key in skip:
                res[key] = val
        if "step" in skip and "bandwidth_GBps" in earlier:
            res["bandwidth_GBps_step"] = earlier["bandwidth_GBps"]
        res.setdefault("merged_from", str(args.merge))
    command = "python benchmarks/engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(res, command)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
