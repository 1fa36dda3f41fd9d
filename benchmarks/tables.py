"""The README's measured tables, rendered from the JSON files in benchmarks/results/.

Every table of measured numbers in README.md sits between two markers,
``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``, and is exactly what ``render(NAME)`` makes
of ``benchmarks/results/NAME.json`` (with a caption naming the device, date, versions and the
command that made the file). ``tests/test_readme_tables.py`` fails when they disagree.

    python -m benchmarks.tables            # check: print the tables that differ
    python -m benchmarks.tables --write    # rewrite README.md's tables from the JSON files
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import torch

from based_compile.op.policy import decide_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def _ms(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _caption(data: dict, command: str) -> str:
    """``command``: what made the file when it does not say (files written before they recorded it)."""
    date = data.get("date", "date not recorded")
    command = data.get("command", command)
    return (f"Measured on one {data['device']} ({date}, torch {data['torch']}, triton {data['triton']}) "
            f"by `{command}`; JSON: `benchmarks/results/{data['_name']}.json`.")


# ----------------------------------------------------------------------------------------- kernels

def _kernels(data: dict) -> str:
    rows = data["results"]
    ts = sorted({r["T"] for r in rows})
    by = {(r["entry"], r["T"]): r for r in rows if r.get("fwd_ms") is not None}
    ours = [e for e in data["entries"] if e.startswith("ours_") and not e.endswith("_split")]

    def best(prefix: str, t: int, key: str):
        found = [(by[e, t][key], e) for e in data["entries"]
                 if e.startswith(prefix) and (e, t) in by and by[e, t].get(key) is not None]
        return min(found) if found else (None, None)

    def with_floor(entry, t, key):
        r = by.get((entry, t))
        if r is None or r.get(key) is None:
            return "–"
        return f"{_ms(r[key])} ({r[key.replace('_ms', '_over_floor')]:.1f})"

    head = (["T"] + [f"ours {e[5:].replace('_', ' ')} fwd" for e in ours]
            + ["fla best fwd", "SDPA d64 fwd", "ours best fwd+bwd", "fla best fwd+bwd", "SDPA d64 fwd+bwd",
               "Inductor fwd+bwd", "ours best fwd+bwd, graph", "SDPA d64 fwd+bwd, graph"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for t in ts:
        fla_f, _ = best("fla_", t, "fwd_ms")
        fla_b, _ = best("fla_", t, "fwdbwd_ms")
        our_b, our_b_entry = best("ours_", t, "fwdbwd_ms")
        cells = [str(t)] + [with_floor(e, t, "fwd_ms") for e in ours]
        cells += [_ms(fla_f), _ms(by.get(("sdpa_causal_d64", t), {}).get("fwd_ms")),
                  with_floor(our_b_entry, t, "fwdbwd_ms") if our_b_entry else "–", _ms(fla_b),
                  _ms(by.get(("sdpa_causal_d64", t), {}).get("fwdbwd_ms")),
                  _ms(by.get(("inductor_naive", t), {}).get("fwdbwd_ms"))]
        our_g, our_g_entry = best("ours_", t, "fwdbwd_graph_ms")
        g_floor = by[our_g_entry, t]["fwdbwd_floor_ms"] if our_g_entry else None
        cells += [f"{_ms(our_g)} ({our_g / g_floor:.1f}, {our_g_entry[5:].replace('_', ' ')})" if our_g_entry else "–",
                  _ms(by.get(("sdpa_causal_d64", t), {}).get("fwdbwd_graph_ms"))]
        lines.append("| " + " | ".join(cells) + " |")
    c = data["config"]
    ceil = data["ceilings"]
    return (_caption(data, "python -m benchmarks --only kernels") + f" B={c['B']}, H={c['H']}, Dk={c['Dk']}, "
            f"Dv={c['Dv']}, {c['dtype']}, {'causal' if c['causal'] else 'non-causal'}, "
            f"{'normalised' if c['normalize'] else 'unnormalised'}; median ms, in brackets the ratio to the "
            f"physical floor (copy {ceil['copy_bytes_per_s'] / 1e12:.1f} TB/s, bf16 matmul "
            f"{ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, measured in the same run). \"graph\": the same "
            f"fwd+bwd call replayed as one CUDA graph (up to T=4096), the kernels' GPU time without the host's "
            f"(Python, autograd, launches), as under `torch.compile(mode=\"reduce-overhead\")`:\n\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------- e2e

E2E_VARIANTS = (("eager", "eager"), ("inductor", "Inductor"), ("based", "**based**"), ("fla", "fla"),
                ("fla_inductor", "fla + Inductor"))


def _e2e(data: dict) -> str:
    rows = {(r["mode"], r["seq_len"], r["variant"]): r for r in data["results"]}
    keys = sorted({(m, t) for m, t, _ in rows}, key=lambda mt: (mt[0] != "train", mt[1]))
    head = ["mode", "T"] + [name for _, name in E2E_VARIANTS] + ["based vs Inductor", "based vs fla + Inductor"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cell(mode, t, variant):
        r = rows.get((mode, t, variant))
        if r is None:
            return "–"
        if r["status"] != "ok":
            return "OOM" if "oom" in r["status"].lower() else r["status"]
        return _ms(r["ms"])

    def ratio(mode, t, other):
        a, b = rows.get((mode, t, "based")), rows.get((mode, t, other))
        if not a or a["status"] != "ok" or not b:
            return "–"
        return f"{b['ms'] / a['ms']:.2f}x" if b["status"] == "ok" else "runs"

    for mode, t in keys:
        label = "train, ms/step" if mode == "train" else "prefill, ms"
        lines.append("| " + " | ".join([label, str(t)] + [cell(mode, t, v) for v, _ in E2E_VARIANTS]
                                       + [ratio(mode, t, "inductor"), ratio(mode, t, "fla_inductor")]) + " |")
    run = data["runs"][-1]
    meta = dict(device=run["device"], date=run["date"], torch=run["torch"], triton=run.get("triton", "?"),
                _name=data["_name"],
                command="` then `".join(dict.fromkeys(r.get("command", "python -m benchmarks --only e2e")
                                                      for r in data["runs"])))
    return (_caption(meta, "python -m benchmarks --only e2e") + f" {run['params'] / 1e6:.0f}M-parameter naive "
            f"LM ({run['layers']} layers, d_model {run['d_model']}, {run['heads']} heads, {run['precision']}), "
            f"{run['tokens']} tokens a step, medians of {run['reps']}:\n\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------- distributed

# A later run of the bfloat16 rows: its medians leave out the profiled last step, which the first
# run's 3-step bfloat16 medians included (44.9 ms instead of 28.6 for one GPU at T=2048).
DISTRIBUTED_BF16 = "distributed_bf16"
# bfloat16 at T=2048 with and without CUDA graphs (--compile-modes default,reduce-overhead).
DISTRIBUTED_GRAPHS = "distributed_graphs"
# FSDP2's unit layouts in bfloat16, with and without CUDA graphs (--wrappers fsdp2 --fsdp-layouts blocks,root).
DISTRIBUTED_FSDP = "distributed_fsdp"


def _distributed(data: dict) -> str:
    head = ["dtype", "T", "run", "step ms", "efficiency", "max abs loss diff", "based::attention calls per forward"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows, note = data["rows"], ""
    if data["_name"] == "distributed" and (RESULTS / f"{DISTRIBUTED_BF16}.json").exists():
        rows = [r for r in rows if r["dtype"] != "bfloat16"]
        note = ("\n\nIts bfloat16 rows are left out: their medians of 3 steps included the last step, which runs "
                "under the profiler that counts the calls. The next table measures them again.")
    if data.get("interconnect"):
        ic = data["interconnect"]
        note += (f"\n\nInterconnect, same run: an all-reduce of {ic['allreduce_mb']} MB of bfloat16 took "
                 f"{ic['allreduce_s'] * 1e3:.1f} ms, a bus bandwidth of {ic['busbw_gb_s']:.0f} GB/s.")
    if any("(CUDA graphs)" in r["run"] for r in rows):
        note += ("\n\nRows marked (CUDA graphs) were compiled with `mode=\"reduce-overhead\"`; their efficiency is "
                 "against the single GPU under CUDA graphs. A graph replay dispatches no operator, so calls are not "
                 "counted there (the benchmark now counts the sites rewritten in the compiled graphs instead); "
                 "where the count is missing, the GPU kernel time of a step shows the rewrite: the same as the "
                 "rewritten model's without CUDA graphs (about 17.5 ms for one GPU), against 36 ms for the "
                 "unrewritten model under Inductor.")
        if any(r["run"].startswith("fsdp2") and "(CUDA graphs)" in r["run"] for r in rows):
            note += (" FSDP2 runs under CUDA graphs only as one unit (\"one unit\": the whole model, gathered "
                     "for the step): with a unit per block it frees and regathers each block's parameters "
                     "inside the step, and the graphs would re-record every step.")
        else:
            note += (" FSDP2 is not run under CUDA graphs here: with a unit per block it frees and regathers its "
                     "parameters, so the graphs would re-record every step.")
    for r in rows:
        step = f"{r['step_s'] * 1e3:.1f}" if r.get("step_s") is not None else r.get("status", "not run")
        eff = f"{r['efficiency']:.2f}" if r.get("efficiency") is not None else ""
        diff = f"{r['max_loss_diff']:.1e}" if r.get("max_loss_diff") is not None else ""
        calls = str(r["based_calls"]) if r.get("based_calls") is not None else ""
        lines.append("| " + " | ".join([r["dtype"], str(r["T"]), r["run"], step, eff, diff, calls]) + " |")
    m = data["model"]
    meta = dict(device=data["device"], date=data["date"], torch=data["torch"], triton=data["triton"],
                _name=data["_name"], command=data["command"])
    return (_caption(meta, data["command"]) + f" Naive Based LM ({m['n_layers']} layers, d_model {m['d_model']}, "
            f"{m['n_heads']} heads, short convs), per-GPU batch {data['per_gpu_batch']}, DDP buckets "
            f"{data['ddp_bucket_cap_mb']} MB; efficiency = step time of one GPU at the per-GPU batch / step time "
            "of the wrapped run on all GPUs:\n\n" + "\n".join(lines) + note)


# ----------------------------------------------------------------------------------- context_parallel

def _context_parallel(data: dict) -> str:
    world = data["world"]
    head = ["run", "T", "GPUs", "step ms", "peak GiB", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in data["runs"]:
        step = f"{r['step_s'] * 1e3:.1f}" if r.get("step_s") is not None else ""
        peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else ""
        lines.append("| " + " | ".join([r["name"], str(r["T"]), str(r["gpus"]), step, peak, r["status"]]) + " |")
    notes = []
    if data.get("step_ratio") is not None:
        notes.append(f"step time on {world} GPUs / one GPU at T = {data['runs'][0]['T']}: "
                     f"{data['step_ratio']:.3f} (efficiency {data['efficiency']:.2f})")
    if data.get("profile", {}).get("exchange_share") is not None:
        prof = data["profile"]
        notes.append(f"state exchange (all-gather kernels, states and convolution halos) "
                     f"{prof['exchange_share']:.1%} of that step, the gradient all-reduce {prof['allreduce_share']:.1%}")
    if data.get("largest_fit_T"):
        notes.append(f"largest T that fits one GPU (doubling): {data['largest_fit_T']}")
    if data.get("loss_max_abs_diff") is not None:
        notes.append(f"loss curves there, one GPU vs {world}: largest absolute difference "
                     f"{data['loss_max_abs_diff']:.1e} ({data['dtype']})")
    m = data["model"]
    text = (_caption(data, data["command"]) + f" Naive Based LM ({m['n_layers']} layers, d_model {m['d_model']}, "
            f"{m['n_heads']} heads, short convs, {data['dtype']}), batch 1, forward + backward + AdamW; one GPU "
            f"against the sequence split over {world} with `context_parallel`:\n\n" + "\n".join(lines))
    if notes:
        text += "\n\n" + "; ".join(notes) + "."
    return text


# ----------------------------------------------------------------------------------------- generate

GENERATE_ENTRIES = (("eager_kv", "eager, KV cache"), ("inductor_kv", "Inductor, KV cache"),
                    ("based_kv", "**based, KV cache**"), ("eager_rec", "eager, recurrent"),
                    ("inductor_rec", "Inductor, recurrent"), ("based_rec", "**based, recurrent**"),
                    ("sdpa_d64", "SDPA d64"))


def _generate(data: dict) -> str:
    rows = {(r["entry"], r["B"], r["T"]): r for r in data["results"]}
    keys = sorted({(r["B"], r["T"]) for r in data["results"]})
    entries = [(e, name) for e, name in GENERATE_ENTRIES if any(r["entry"] == e for r in data["results"])]
    head = ["B", "context"] + [name for _, name in entries]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for b, t in keys:
        cells = [str(b), f"{t // 1024}k" if t % 1024 == 0 else str(t)]
        for e, _ in entries:
            r = rows.get((e, b, t))
            cells.append("–" if r is None else (r["status"] if r["status"] != "ok"
                                                 else f"{_ms(r['ms'])} ({r['over_floor']:.1f})"))
        lines.append("| " + " | ".join(cells) + " |")
    c, ceil = data["config"], data["ceilings"]
    text = (_caption(data, "python -m benchmarks --only generate") + f" One attention layer, H={c['H']}, "
            f"Dk={c['Dk']}, Dv={c['Dv']}, {c['dtype']}: GPU ms of one decode step (CUDA graph replay, L2 "
            f"flushed, median), in brackets the ratio to its floor (bytes it must read and write per token over "
            f"the copy bandwidth, {ceil['copy_bytes_per_s'] / 1e12:.1f} TB/s in the same run):\n\n" + "\n".join(lines))
    if data.get("model_results"):
        text += "\n\n" + _generate_model(data)
    if (RESULTS / "generate.png").exists():
        text += "\n\n![decode ms per step against context](benchmarks/results/generate.png)"
    return text


MODEL_SETUPS = {"kv_cache": "KV cache", "recurrent": "recurrent, functional states",
                "static": "recurrent, static cache (in place)",
                "recurrent_cudagraphs": "recurrent, functional states cloned per token, CUDA graphs",
                "static_cudagraphs": "**recurrent, static cache, CUDA graphs**"}


def _generate_model(data: dict) -> str:
    """The whole-model table: per entry tokens/s, wall and GPU ms per token, and the ratios."""
    m = data["model"]
    by = {r["entry"]: r for r in data["model_results"]}
    ok = {e: r for e, r in by.items() if r["status"] == "ok"}
    best = max((r["tokens_per_s"] for e, r in ok.items() if e.startswith("inductor")), default=None)
    timed = any(r.get("gpu_ms") is not None for r in ok.values())
    head = ["compiler", "setup", "tokens/s", "ms/token"] + (["GPU ms/token"] if timed else []) + \
        ["vs Inductor, same setup", "vs Inductor's best"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in data["model_results"]:
        compiler, _, setup = r["entry"].partition("_")
        cells = [compiler, MODEL_SETUPS.get(setup, setup.replace("_", " "))]
        if r["status"] != "ok":
            lines.append("| " + " | ".join(cells + [r["status"]] + ["–"] * (len(head) - 3)) + " |")
            continue
        ref = ok.get("inductor_" + setup)
        cells += [f"{r['tokens_per_s']:.1f}", _ms(r["ms"])]
        if timed:
            gpu = r.get("gpu_ms")
            cells.append("–" if gpu is None else _ms(gpu) + ("" if r.get("gpu_timed") else " (not isolated)")
                         + (" (host-bound)" if r.get("host_bound") else ""))
        cells.append(f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "–")
        cells.append(f"{r['tokens_per_s'] / best:.2f}x" if best else "–")
        lines.append("| " + " | ".join(cells) + " |")
    gpu_text = (" \"GPU ms/token\": the GPU's own time per token, the host queueing tokens ahead of it "
                "(CUDA events around the tokens after a sleep kernel that holds the stream); \"host-bound\": "
                "the loop's wall time per token is over 1.25x that, so the host, not the model, sets the "
                "tokens/s." if timed else "")
    return (f"Whole model (examples/generate.py's LM, {m['layers']} layers, d_model {m['d_model']}, "
            f"{m['heads']} heads, bf16, B={m.get('batch', 1)}) decoding at a context of {m['context']} tokens, "
            f"{m['steps']} greedy steps; \"ms/token\": the decode loop's wall time per step; \"CUDA graphs\": "
            f"`mode=\"reduce-overhead\"`." + gpu_text + "\n\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------- crossover

def _crossover(data: dict) -> str:
    kernels = ("parallel", "fused_chunk", "chunked")
    head = (["B", "T"] + [f"{k.replace('_', ' ')} fwd" for k in kernels] + ["policy, inference"]
            + [f"{k.replace('_', ' ')} fwd+bwd" for k in kernels] + ["policy, training"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    c = data["config"]
    for r in data["rows"]:
        cells = [str(r["B"]), str(r["T"])]
        for mode, training in (("fwd", False), ("fwdbwd", True)):
            times = {k: r.get(f"{k}_{mode}") for k in kernels}
            best = min((t, k) for k, t in times.items() if t is not None)[1]
            cells += [("**" + _ms(t) + "**" if k == best else _ms(t)) for k, t in times.items()]
            cells.append(decide_for("cuda", training, r["T"], c["Dk"], c["Dv"], r["B"] * c["H"],
                                    torch.bfloat16).kernel.replace("_", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return (_caption(data, "python benchmarks/crossover_h200.py --out OUT") + f" H={c['H']}, Dk={c['Dk']}, "
            f"Dv={c['Dv']}, {c['dtype']}, causal, normalised; median ms, the fastest in bold, and the kernel "
            f"the policy (based_compile/op/policy.py) picks for that call:\n\n" + "\n".join(lines))


RENDERERS = {"kernels": _kernels, "crossover": _crossover, "crossover_short": _crossover, "crossover_dk32_dv64": _crossover,
             "crossover_dk16_dv128": _crossover, "e2e": _e2e, "distributed": _distributed, DISTRIBUTED_BF16: _distributed,
             DISTRIBUTED_GRAPHS: _distributed, DISTRIBUTED_FSDP: _distributed, "generate": _generate,
             "context_parallel": _context_parallel}


def load(name: str) -> dict:
    data = json.loads((RESULTS / f"{name}.json").read_text())
    data["_name"] = name
    return data


def render(name: str) -> str:
    """The table of ``benchmarks/results/NAME.json``; a line saying how to make it while there is none."""
    if not (RESULTS / f"{name}.json").exists():
        return f"Not measured yet: `python -m benchmarks --only {name}` on a GPU makes this table.\n"
    return RENDERERS[name](load(name)).rstrip() + "\n"


def readme_blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def stale_tables(text: str) -> list[str]:
    """Names of README tables that differ from what their JSON renders to (or have no renderer)."""
    return [name for name, body in readme_blocks(text).items()
            if name not in RENDERERS or body != render(name)]


def write(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m["name"]) + m.group(4), text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite README.md's tables from benchmarks/results")
    args = p.parse_args(argv)
    text = README.read_text()
    if args.write:
        README.write_text(write(text))
        return 0
    stale = stale_tables(text)
    for name in stale:
        print(f"README table {name!r} differs from benchmarks/results/{name}.json; it renders as:\n{render(name)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
