"""llama.cpp's decoding speed on a GGUF file written by `ch07.export_gguf`: greedy tokens per second.

    python -m benchmarks.llamacpp_decode --quick                      # tiny random GPTModel, a smoke test
    python -m benchmarks.llamacpp_decode --model gpt2                 # GPT-2 124M exported as f32, f16, q8_0
    python -m benchmarks.llamacpp_decode --gguf outputs/ch07/x.gguf   # files you already have

`llamacpp_decode(path, n_tokens)` is the measurement, for a side-by-side table with our own decoding
rows: load the file with llama-cpp-python, evaluate a prompt, then `n_tokens` greedy steps, each one
token through llama.cpp (`Llama.eval`) and the argmax of its logits (no sampler, so the loop does what
chapter 5's greedy `generate` with the KV cache does). The prompt is timed apart from the decoding, and
the fastest of `repeats` runs is kept (after one warm-up). Threads: torch's count unless `--threads`,
so the rows compare like with like.

Writes llamacpp_decode.md and llamacpp_decode.json into --out (default benchmarks/results/).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from llmfs.bench import machine_description, write_report
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run
from llmfs.errors import InvalidInput
from llmfs.gguf_export import open_llama_cpp

PROMPT = "Every effort moves you"


def llamacpp_decode(path: str | Path, n_tokens: int, prompt_ids: list[int] | None = None,
                    n_threads: int | None = None, repeats: int = 3, extra_buffers: bool = False) -> dict:
    """Greedy-decode `n_tokens` tokens with llama.cpp from the GGUF file `path`; returns tokens/s and more.

    Keys: tokens (the ids, to compare with ours), tokens_per_s (decoding only), prompt_tokens_per_s,
    load_s, n_threads, llama_cpp (version). The context is sized for prompt + tokens. `extra_buffers`: llama.cpp's
    repacked weights for the CPU's AMX / int8 kernels (`llmfs.gguf_export.open_llama_cpp`: off by default,
    they crash q8_0 files on AMX Xeons with llama-cpp-python 0.3.36).
    """
    import llama_cpp
    import numpy as np
    import torch

    if prompt_ids is None:
        from ch02.tokenizer import get_gpt2_tokenizer

        prompt_ids = get_gpt2_tokenizer().encode(PROMPT)
    n_threads = n_threads or torch.get_num_threads()
    start = time.perf_counter()
    llm = open_llama_cpp(path, extra_buffers, n_ctx=len(prompt_ids) + n_tokens, n_batch=max(len(prompt_ids), 8),
                         n_threads=n_threads, n_threads_batch=n_threads)
    load_s = time.perf_counter() - start
    trained = int(llm.metadata.get(f"{llm.metadata.get('general.architecture')}.context_length", 0))
    if len(prompt_ids) + n_tokens > trained:
        raise InvalidInput(f"{path}: {len(prompt_ids)} prompt + {n_tokens} new tokens exceed the model's context "
                           f"of {trained}")
    n_vocab = llm.n_vocab()
    best = None
    for _ in range(repeats + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        t1 = time.perf_counter()
        tokens = []
        for _ in range(n_tokens):
            # the last token's logits, read in place (Llama.scores keeps them only with logits_all)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            nxt = int(np.argmax(logits))
            tokens.append(nxt)
            if len(tokens) < n_tokens:
                llm.eval([nxt])
        t2 = time.perf_counter()
        run = {"prompt_s": t1 - t0, "decode_s": t2 - t1}
        if best is None or run["decode_s"] < best["decode_s"]:
            best = run
        best_tokens = tokens
    steps = max(n_tokens - 1, 1)  # the first token comes from the prompt's logits
    return {"file": str(path), "tokens": best_tokens, "n_tokens": n_tokens, "prompt_tokens": len(prompt_ids),
            "tokens_per_s": steps / best["decode_s"] if best["decode_s"] > 0 else float("inf"),
            "prompt_tokens_per_s": len(prompt_ids) / best["prompt_s"], "load_s": load_s, "n_threads": n_threads,
            "llama_cpp": llama_cpp.__version__}


def export_files(model_spec: str | None, quick: bool, folder: Path):
    """(model, {type: file}): the model as GGUF in f32, f16 and q8_0 (quick: a tiny random GPTModel with
    GPT-2's vocabulary)."""
    import torch

    from ch04.gpt import GPT_CONFIG_124M, GPTModel
    from ch07.cli import load_chat_model
    from ch07.export_gguf.export_gguf import export_gguf

    if quick and model_spec is None:
        torch.manual_seed(123)
        model = GPTModel({**GPT_CONFIG_124M, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                          "drop_rate": 0.0}).eval()
    else:
        model = load_chat_model(model_spec or "gpt2", device="cpu").model
    return model, {t: export_gguf(model, folder / f"bench-{t}.gguf", t, overwrite=True)[0]
                   for t in ("f32", "f16", "q8_0")}


def our_greedy_tokens(model, n_tokens: int) -> list[int]:
    """Chapter 5's greedy `generate` with the KV cache on the same prompt: the tokens llama.cpp should give."""
    import torch

    from ch02.tokenizer import get_gpt2_tokenizer
    from ch05.gpt_generate import generate

    ids = torch.tensor([get_gpt2_tokenizer().encode(PROMPT)])
    with torch.no_grad():
        out = generate(model, ids, max_new_tokens=n_tokens, context_size=model.cfg["context_length"], use_cache=True)
    return out[0, ids.shape[1]:].tolist()


def summarize(rows: list[dict], machine: dict, quick: bool) -> str:
    lines = ["# llama.cpp greedy decoding (llama-cpp-python)", "",
             f"{machine['cpu']}, {machine['cores']} cores, {rows[0]['n_threads'] if rows else '?'} threads; "
             f"llama-cpp-python {rows[0]['llama_cpp'] if rows else '?'}, torch {machine['torch']}"
             + ("; quick mode: a tiny random model, the harness is checked, not the speed" if quick else ""), "",
             "| file | type | prompt tokens | new tokens | decode tokens/s | prompt tokens/s | load s | tokens as ours |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = f"{r['same_as_ours']}/{r['n_tokens']}" if r.get("same_as_ours") is not None else "-"
        lines.append(f"| {Path(r['file']).name} | {r.get('type', '?')} | {r['prompt_tokens']} | {r['n_tokens']} | "
                     f"{r['tokens_per_s']:.1f} | {r['prompt_tokens_per_s']:.1f} | {r['load_s']:.2f} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.llamacpp_decode [options]`; returns the exit code."""
    p = Parser(prog="python -m benchmarks.llamacpp_decode",
               description="Greedy decoding speed of GGUF files in llama.cpp (llama-cpp-python).")
    add_quick_argument(p, "a tiny random model and few tokens: checks the harness, not the speed")
    p.add_argument("--gguf", type=path_argument, nargs="+", default=None, help="GGUF files to measure")
    p.add_argument("--model", default=None,
                   help="export this model (anything ch07.export_gguf reads; default gpt2) as f32, f16 and q8_0")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens to decode (default 128; quick 8)")
    p.add_argument("--threads", type=positive_int, default=None, help="llama.cpp threads (default: torch's)")
    p.add_argument("--extra-buffers", action="store_true",
                   help="let llama.cpp repack weights for the CPU's AMX / int8 kernels (crashes q8_0 files on AMX "
                        "Xeons with llama-cpp-python 0.3.36)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed runs, the fastest kept (default 3; quick 1)")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results",
                   help="folder for llamacpp_decode.md and .json (default benchmarks/results)")
    args = p.parse_args(argv)
    n_tokens = args.max_new_tokens or (8 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)

    def benchmark() -> None:
        check_output_dir(args.out, option="--out")
        for f in args.gguf or ():
            if not f.is_file():
                raise FileNotFoundError(f"--gguf {f} does not exist")
        machine = machine_description()
        with tempfile.TemporaryDirectory() as tmp:
            model, files = ((None, {f.stem: f for f in args.gguf}) if args.gguf
                            else export_files(args.model, args.quick, Path(tmp)))
            ours = our_greedy_tokens(model, n_tokens) if model is not None else None
            rows = [{**llamacpp_decode(f, n_tokens, n_threads=args.threads, repeats=repeats,
                                       extra_buffers=args.extra_buffers), "type": t, "extra_buffers": args.extra_buffers}
                    for t, f in files.items()]
        for r in rows:  # greedy steps that pick our token, up to the first difference and after it
            r["same_as_ours"] = None if ours is None else sum(a == b for a, b in zip(r["tokens"], ours))
        goals = [] if ours is None else [("llama.cpp's f32 file decodes our greedy tokens",
                                          rows[0]["tokens"] == ours)]
        table = summarize(rows, machine, args.quick)
        write_report(args.out, "llamacpp_decode.json", "llamacpp_decode.md",
                     {"machine": machine, "quick": args.quick, "our_tokens": ours, "results": rows}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
