"""Engine benchmark: how close the native backend gets to the memory floor.

Measures, for each weight format (float32, bfloat16, int8, int4), on the default
model (SmolLM2-135M-Instruct):

1. forward time of 1, 4, 8, 16, 32, 64 new tokens after a 512-token prompt;
2. a plain decode step vs the bare matrix products of the same step (same
   weights, same kernels, same run; for a format whose layers run in one C
   call, the products through that call's loop) vs the memory-read floor
   (bytes of weights / measured read bandwidth);
3. plain greedy tokens/s of paradecode vs transformers' ``model.generate``
   (greedy, same prompts, same dtype, interleaved, chat prompts, 64 tokens);
4. perplexity of each format on ``paradecode/data/ppl_text.txt``;
5. peak resident memory (RSS) of a process that loads the model and decodes;
6. llama.cpp (``llama-cpp-python`` on the default model's Q4_1 GGUF), when it
   is installed: plain greedy tokens/s at 1 and 2 threads next to paradecode's
   plain decoding, and one ``llm.eval`` call of 1, 8, 16 tokens after a
   512-token prompt next to the native forward (section ``llamacpp``).

Every comparison is interleaved in one process (A, B, A, B, ...) and reported
as a median after warm-up: the machine is shared, so absolute numbers drift
with the load of the moment; ratios within one run are what to read.

    python benchmarks/engine.py --threads 1 --out benchmarks/engine-results.md
    python benchmarks/engine.py --threads 1 --sections llamacpp --out benchmarks/llamacpp-results.md
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
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

from paradecode.models.native import MIN_ROWS
from paradecode.models.quant import linear

FORMATS = ("float32", "bfloat16", "int8", "int4")
LLAMACPP_EXTRA_FORMATS = ()   # formats compared with llama.cpp's Q4_1 beyond FORMATS
BLOCKS = (1, 4, 8, 16, 32, 64)
LLAMACPP_BLOCKS = (1, 8, 16)
LLAMACPP_THREADS = (1, 2)
SECTIONS = ("blocks", "step", "ppl", "generate", "llamacpp", "rss")
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
            "kernels": info["kernels"], "threads": info["torch_threads"], "torch": info["versions"]["torch"],
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


def bench_blocks(models, reps: int, prompt_len: int = 512, blocks=BLOCKS) -> dict:
    """Forward time of T new tokens after a cached prompt, per format (interleaved)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, prompt_len + max(blocks)), generator=g)
    caches = {}
    for f, m in models.items():
        c = m.new_cache(1, prompt_len + max(blocks))
        m.forward(c, ids[:, :prompt_len], logits_for=torch.tensor([prompt_len - 1]))
        caches[f] = c
    times = {(f, T): [] for f in models for T in blocks}
    for _ in range(reps + 1):
        for f, m in models.items():
            for T in blocks:
                c = caches[f]
                c.rollback(prompt_len)
                t = time.perf_counter()
                m.forward(c, ids[:, prompt_len:prompt_len + T])
                times[(f, T)].append(time.perf_counter() - t)
    return {f: {T: median_ms(times[(f, T)]) for T in blocks} for f in models}


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
            # the rows a one-token step feeds each projection: padded to MIN_ROWS in float32/bfloat16
            rows = MIN_ROWS if m._pad_rows else 1
            xs = {k: torch.randn(rows, k).to(m.dtype) for k in (m.shape.hidden, m.shape.heads * m.shape.head_dim,
                                                               m.shape.intermediate)}
            mats = m.matrices()
            s = m.shape
            t = time.perf_counter()
            with torch.inference_mode():
                if m.fused:    # the step's layers run in one C call (stack.c): so do their bare products
                    m._stack.products(m.layers_all, xs[s.hidden], xs[s.heads * s.head_dim], xs[s.intermediate])
                    linear(xs[s.hidden], m.lm_head)
                else:
                    for w in mats:
                        linear(xs[w.shape[1]], w)
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


def chat_prompt_ids(model, n_prompts: int) -> list[list[int]]:
    from paradecode.api import encode_prompt

    return [encode_prompt(model, p, chat=True) for p in PROMPTS[:n_prompts]]


def paradecode_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    from paradecode.api import generate

    return generate(model, ids, max_new_tokens=new_tokens, ignore_eos=True).token_ids


def transformers_greedy(hf, ids: list[int], new_tokens: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    return y[0, len(ids):].tolist()


def interleaved_tps(runners: dict, prompt_ids: list[list[int]], reps: int, new_tokens: int):
    """Tokens/s of each runner (prompt ids -> ``new_tokens`` greedy ids), round-robin per prompt.

    Returns each runner's tokens/s over ``reps`` rounds after one warm-up round (take the median),
    and its tokens from the warm-up round (one list per prompt).
    """
    rates = {k: [] for k in runners}
    tokens = {k: [] for k in runners}
    for rep in range(reps + 1):
        for ids in prompt_ids:
            for k, run in runners.items():
                t = time.perf_counter()
                out = run(ids)
                rates[k].append(new_tokens / (time.perf_counter() - t))
                if rep == 0:
                    tokens[k].append(out)
    skip = len(prompt_ids)  # first round is warm-up
    return {k: v[skip:] for k, v in rates.items()}, tokens


def identical_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_generate(models, formats, path, reps: int, new_tokens: int = 64, n_prompts: int = len(PROMPTS)) -> dict:
    """Plain greedy decoding: paradecode vs transformers' generate, same dtype, interleaved."""
    from transformers import AutoModelForCausalLM

    runners = {}
    for f in formats:
        runners[f"paradecode/{f}"] = functools.partial(paradecode_greedy, models[f], new_tokens=new_tokens)
        if f in ("float32", "bfloat16"):
            hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, f)).eval()
            runners[f"transformers/{f}"] = functools.partial(transformers_greedy, hf, new_tokens=new_tokens)
    rates, tokens = interleaved_tps(runners, chat_prompt_ids(models[formats[0]], n_prompts), reps, new_tokens)
    same = {f: [identical_prefix(*p) for p in zip(tokens[f"paradecode/{f}"], tokens[f"transformers/{f}"])]
            for f in formats if f"transformers/{f}" in tokens}
    return {"tokens_per_s": {k: statistics.median(v) for k, v in rates.items()}, "identical_prefix": same,
            "new_tokens": new_tokens}


def llamacpp_unavailable() -> str | None:
    """Why the llama.cpp section cannot run here, or None (a build that crashes, e.g. its AMX kernels on some
    machines, is caught by the bench peer's smoke test in a child process: see docs/benchmark.md)."""
    from paradecode.bench.peers import smoke_test_llama
    from paradecode.errors import UserError
    from paradecode.models.loading import default_gguf

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'paradecode[llamacpp]')"
    try:
        gguf = default_gguf()
    except UserError as e:
        return e.message
    return smoke_test_llama(gguf)


class LlamaCppForward:
    """A llama.cpp context dressed as a native model for :func:`bench_blocks`: a forward is one ``llm.eval``."""

    def __init__(self, llm):
        self.llm = llm

    def new_cache(self, batch_size: int, capacity: int):
        self.llm.reset()
        return self

    def rollback(self, length: int) -> None:
        self.llm.n_tokens = length      # the next eval drops the KV cells from here on

    def forward(self, cache, input_ids, logits_for=None) -> None:
        self.llm.eval(input_ids[0].tolist())


def bench_llamacpp(models, reps: int, gen_reps: int, new_tokens: int = 64, n_prompts: int = len(PROMPTS)) -> dict:
    """llama.cpp on the Q4_1 GGUF vs the native backend per format, interleaved in this process.

    Plain greedy tokens/s (EOS ignored, like paradecode's side) at 1 and 2 llama.cpp threads; and the
    time of one ``llm.eval`` of T tokens after a 512-token prompt, with logits for all T positions
    (what a verifying forward needs, and what the native forward returns).
    """
    import llama_cpp

    from paradecode.bench.peers import llama_greedy, open_llama
    from paradecode.models.loading import default_gguf

    gguf = default_gguf()
    runners = {f"paradecode/{f}": functools.partial(paradecode_greedy, m, new_tokens=new_tokens)
               for f, m in models.items()}
    for n in LLAMACPP_THREADS:
        llm = open_llama(gguf, n, n_ctx=1024)
        runners[f"llama.cpp/{n}"] = functools.partial(llama_greedy, llm, max_new_tokens=new_tokens)
    rates, tokens = interleaved_tps(runners, chat_prompt_ids(next(iter(models.values())), n_prompts), gen_reps,
                                    new_tokens)
    same = {f: [identical_prefix(*p) for p in zip(tokens[f"paradecode/{f}"], tokens["llama.cpp/1"])]
            for f in models}
    fwd = LlamaCppForward(open_llama(gguf, 1, n_ctx=768, logits_all=True))
    blocks = bench_blocks({**models, "llama.cpp": fwd}, reps, blocks=LLAMACPP_BLOCKS)
    return {"tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
            "tokens_per_s_range": {k: (min(v), max(v)) for k, v in rates.items()},
            "identical_prefix": same, "new_tokens": new_tokens, "blocks": blocks,
            "llama_cpp_version": llama_cpp.__version__, "gguf": gguf.name}


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
         f"Machine: {m['cpu']}, {m['cores']} cores (AVX-512 BF16: {m['avx512_bf16']}"
         + (f"; kernels: {m['kernels']}" if m.get("kernels") else "") + "), shared with other "
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
    if "llamacpp" in res:
        L += report_llamacpp(res["llamacpp"])
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


def report_llamacpp(r: dict) -> list[str]:
    if "skipped" in r:
        return ["## llama.cpp", "", f"Skipped: {r['skipped']}.", ""]
    tps, base = r["tokens_per_s"], r["tokens_per_s"]["llama.cpp/1"]
    L = [f"## llama.cpp (llama-cpp-python {r['llama_cpp_version']}, `{r['gguf']}`) vs paradecode native", "",
         f"Plain greedy decoding, {r['new_tokens']} new tokens (EOS ignored), chat prompts, interleaved "
         "(tokens/s, median). paradecode always uses the torch thread count above.", "",
         "| engine / weights | threads | tokens/s | min – max | vs llama.cpp 1 thread |", "|---|---|---|---|---|"]
    for k, v in tps.items():
        engine, what = k.split("/")
        threads, label = (what, "llama.cpp / Q4_1") if engine == "llama.cpp" else ("torch", f"paradecode / {what}")
        lo, hi = r["tokens_per_s_range"][k]
        L.append(f"| {label} | {threads} | {v:.1f} | {lo:.1f} – {hi:.1f} | {v / base:.2f}x |")
    L += ["", "Tokens identical to llama.cpp's (1 thread) before the first difference (per prompt, of "
          f"{r['new_tokens']}): " + ", ".join(f"{f}: {v}" for f, v in r["identical_prefix"].items()), "",
          "One forward (native) / one `llm.eval` call (llama.cpp, 1 thread, logits for every new position) "
          "of T new tokens after a 512-token prompt (ms, median):", "",
          "| engine / format | " + " | ".join(f"T={T}" for T in LLAMACPP_BLOCKS) + " | T=16 / T=1 |",
          "|---|" + "---|" * (len(LLAMACPP_BLOCKS) + 1)]
    for f, row in r["blocks"].items():
        row = {int(T): v for T, v in row.items()}
        label = "llama.cpp / Q4_1" if f == "llama.cpp" else f"native / {f}"
        L.append(f"| {label} | " + " | ".join(f"{row[T]:.1f}" for T in LLAMACPP_BLOCKS)
                 + f" | {row[16] / row[1]:.2f}x |")
    return L + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up round")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sections to run: "
                    + ",".join(SECTIONS) + " (llamacpp only runs where llama-cpp-python and the GGUF are installed)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip (e.g. llamacpp)")
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
    wanted = {s for s in args.sections.split(",") if s} - set(args.skip.split(","))
    if wanted - set(SECTIONS):
        ap.error(f"unknown section(s) {', '.join(sorted(wanted - set(SECTIONS)))}; choose from {', '.join(SECTIONS)}")
    skip = set(SECTIONS) - wanted
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
    if "llamacpp" not in skip:
        why = llamacpp_unavailable()
        if why:
            res["llamacpp"] = {"skipped": why}
        else:
            from paradecode.models.native import DTYPES

            extra = [f for f in LLAMACPP_EXTRA_FORMATS if f in DTYPES and f not in models]
            res["llamacpp"] = bench_llamacpp({**models, **(load_all(extra)[0] if extra else {})}, args.reps,
                                             args.gen_reps or max(1, args.reps // 2), n_prompts=args.gen_prompts)
        print("llamacpp", json.dumps(res["llamacpp"], indent=1), flush=True)
    del models
    if "rss" not in skip:
        res["rss"] = {f"native/{f}": peak_rss(f, "native", args.threads) for f in formats}
        for f in formats:
            if f in ("float32", "bfloat16"):                            # transformers has no int8/int4 here
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
