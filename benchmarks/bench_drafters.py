"""Quick speed check of the draft-and-verify drafters against plain decoding.

    python benchmarks/bench_drafters.py [--max-new-tokens 128] [--repeats 3] [--methods pld,ngram,recycle]
        [-o pld:num_draft_tokens=8 ...]

Greedy, batch 1, the default model. Methods are interleaved within each repeat
(plain, pld, ngram, ... then again) so that load from other processes hits
them alike; one warm-up round is discarded; the table shows the median
tokens/s, the speedup over plain measured in the same run, MAT (tokens per
target call) and whether the output equals plain's token for token.
"""

from __future__ import annotations

import argparse
import statistics

import paradecode as pd

TASKS = {
    "summarisation": (
        "Summarize the following text in two sentences.\n\n"
        "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
        "Supporters said the lanes would make cycling safer and reduce traffic. Shop owners worried "
        "that removing parking spaces would hurt their business. The council voted 5 to 2 to build "
        "the lanes next spring, and promised to add a new parking lot behind the library. "
        "Construction will start in March and is expected to take about three months. The mayor said "
        "the project is paid for by a state grant for safer streets, so local taxes will not rise."
    ),
    "open chat": "Tell me a short story about a dragon who is afraid of the dark.",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="pld,ngram,recycle")
    ap.add_argument("-o", action="append", default=[], metavar="METHOD:KEY=VALUE")
    args = ap.parse_args()
    methods = ["plain"] + args.methods.split(",")
    options: dict[str, dict[str, str]] = {m: {} for m in methods}
    for o in args.o:
        m, kv = o.split(":", 1)
        k, v = kv.split("=", 1)
        options[m][k] = v

    model = pd.load_model()
    print(f"| task | method | tok/s (median of {args.repeats}) | speedup | MAT | identical |")
    print("|---|---|---|---|---|---|")
    for task, prompt in TASKS.items():
        runs: dict[str, list] = {m: [] for m in methods}
        for r in range(args.repeats + 1):
            for m in methods:
                out = pd.generate(model, prompt, m, options[m], chat=True, max_new_tokens=args.max_new_tokens)
                if r > 0:                                 # round 0 is the warm-up
                    runs[m].append(out)
        base = statistics.median(o.stats.tokens_per_s for o in runs["plain"])
        ref = runs["plain"][0].token_ids
        for m in methods:
            tps = statistics.median(o.stats.tokens_per_s for o in runs[m])
            mat = statistics.median(o.stats.tokens_per_call for o in runs[m])
            same = all(o.token_ids == ref for o in runs[m])
            print(f"| {task} | {m} | {tps:.1f} | {tps / base:.2f}x | {mat:.2f} | {'yes' if same else 'NO'} |",
                  flush=True)


if __name__ == "__main__":
    main()
