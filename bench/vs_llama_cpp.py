"""glmrt against llama.cpp on the CPU, same checkpoint, same threads, one process (issue 14).

    pip install gguf llama-cpp-python        # llama-cpp-python builds llama.cpp for this CPU
    python3 bench/vs_llama_cpp.py            # the issue's 1.45B model: about an hour, ~12 GB of disk at peak
    python3 bench/vs_llama_cpp.py --small    # the same pipeline on a 20M-parameter model, 2-3 minutes
    python3 bench/vs_llama_cpp.py --check    # only the GGUF conversion check (bench/gguf_check.py)
    python3 bench/vs_llama_cpp.py --glmrt "int4-a8=--precision int4 --int8-activations" ...
    python3 bench/vs_llama_cpp.py --glmrt "int4@cpu=--precision int4 --target cpu" ...   # glmrt's cpu engine

(Not named llama_cpp.py: run as a script, bench/ comes first on sys.path and a file of that
name would shadow the llama_cpp package it imports.)

The pipeline: the GGUF conversion check first (a small model: llama.cpp's F16 logits against
glmrt's float64 reference; the run stops if it fails); then a random-weight checkpoint made by
glmrt's make_checkpoint (the issue's shape by default: hidden 2048, intermediate 6848, 16
layers, heads 16/2 x 128, vocab 151552; reused when the work folder already holds it), an F16
GGUF of it (bench/gguf_export.py) and llama.cpp's own Q4_0 / Q8_0 of that (llama_model_quantize);
glmrt exports with the given `glmrt export` options. Each glmrt export is timed beside the
llama.cpp file of its precision (int4 - Q4_0, int8 - Q8_0, anything else - F16), for each thread
count, llama.cpp first, then glmrt, then the files of that pair are deleted.

What is timed, the same way on both sides (glmrt through glmrt.benchmark.bench):
- prefill N (pp128, pp512): a fresh sequence, N random token ids in one call, ending with the
  last position's logits on the host and their argmax (what generation does; llama.cpp with
  logits_all off computes only that row, glmrt's graph gathers only that row). One warm-up at
  the shortest length, then the median of --repeats.
- decode: a 128-token context, then 8 warm-up and --decode-steps timed greedy steps, each one
  token in, the logits (vocab floats) read on the host, argmax; the median step.
llama.cpp runs through llama-cpp-python's Llama: eval() and llama_get_logits_ith, n_batch =
n_ubatch = 512, f16 KV cache (its default), memory mapped weights, flash attention off (the
Python package's default) and on (the llama.cpp CLI's `auto` picks it on the CPU); each glmrt
row is compared with the faster of the two, figure by figure. glmrt: ONNX Runtime CPU, fp32
KV cache, intra-op threads = threads.
% of ceiling: bytes streamed per token (everything but the embedding table: for llama.cpp the
GGUF's tensors less token_embd, for glmrt its manifest's figure) over the host's memory copy
rate with the same threads (glmrt.host.copy_rate_gbps), measured at the start and at the end:
the higher of the two (a copy timed while something else shares the memory system reads low;
a row still above 100% is marked: the ceiling was measured low).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]   # no shadowing from bench/

ISSUE_SIZES = dict(vocab_size=151552, hidden_size=2048, intermediate_size=6848, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=2, head_dim=128,
                   max_position_embeddings=32768, attention_bias=True)
SMALL_SIZES = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                   max_position_embeddings=2048, attention_bias=True)
DEFAULT_GLMRT = ["fp32=--precision fp32", "int8=--precision int8", "int4=--precision int4"]
PAIR = {"int4": "q4_0", "int8": "q8_0"}              # glmrt precision -> llama.cpp file; else f16
GOAL = {"int4": {"decode": 1.2, "prefill": 1.0}, "int8": {"decode": 1.0, "prefill": 1.0}}   # issue 14
LLAMA_LABEL = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
ORDER = ["q4_0", "q8_0", "f16"]                      # f16 last: the quantized files are made from it
N_BATCH = 512
WARMUP = 8


def sibling(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"glmrt_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- llama.cpp ------------------------------------------------------------------------------
def time_llama(path: Path, *, threads: int, prompts, context: int, steps: int, repeats: int,
               flash_attn: bool) -> dict:
    """Prefill and decode through llama-cpp-python, timed as glmrt.benchmark.bench times glmrt."""
    import llama_cpp
    n_ctx = -(-max(max(prompts), context + steps + WARMUP + 1) // 256) * 256
    t = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=threads,
                          n_threads_batch=threads, flash_attn=flash_attn, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t
    vocab = llm.n_vocab()
    rng = np.random.default_rng(0)
    memory = llama_cpp.llama_get_memory(llm.ctx)

    def prompt(n):
        return rng.integers(3, min(vocab, 1000), size=n).tolist()

    def fresh():
        llama_cpp.llama_memory_clear(memory, True)
        llm.reset()

    def argmax_last() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def prefill_time(n):
        ids = prompt(n)
        fresh()
        t = time.perf_counter()
        llm.eval(ids)
        argmax_last()
        return time.perf_counter() - t

    out = {"n_ctx": n_ctx, "n_batch": N_BATCH, "n_ubatch": N_BATCH, "flash_attn": flash_attn,
           "kv_cache": "f16", "load_s": load_s, "prefill": {}}
    prefill_time(min(prompts))
    for n in prompts:
        med = float(np.median([prefill_time(n) for _ in range(repeats)]))
        out["prefill"][n] = {"ms": 1e3 * med, "tok_s": n / med}
    fresh()
    llm.eval(prompt(context))
    token = argmax_last()
    times = []
    for i in range(steps + WARMUP):
        t = time.perf_counter()
        llm.eval([token])
        token = argmax_last()
        if i >= WARMUP:
            times.append(time.perf_counter() - t)
    med = float(np.median(times))
    out["decode"] = {"context": context, "ms": 1e3 * med, "tok_s": 1.0 / med}
    llm.close()
    del llm
    gc.collect()
    return out


def gguf_bytes_per_token(info: dict) -> int:
    """Bytes a decode step streams: every tensor but the embedding table (a row gather)."""
    return info["tensor_bytes"] - info["token_embd_bytes"]


def describe_gguf(path: Path) -> dict:
    import gguf
    r = gguf.GGUFReader(str(path))
    types, roles, total, embd = {}, {}, 0, 0
    for t in r.tensors:
        d = types.setdefault(t.tensor_type.name, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += int(t.n_bytes)
        total += int(t.n_bytes)
        if t.name in ("output.weight", "token_embd.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight"):
            roles[t.name] = t.tensor_type.name
        if t.name == "token_embd.weight":
            embd = int(t.n_bytes)
    del r
    return {"file_bytes": path.stat().st_size, "tensor_bytes": total, "token_embd_bytes": embd,
            "types": types, "roles": roles}


# ---- glmrt ----------------------------------------------------------------------------------
def export_precision(args: str) -> str:
    """The --precision an export option string asks for (glmrt export's default: fp32)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--precision", default="fp32")
    return ap.parse_known_args(shlex.split(args))[0].precision


def glmrt_cli(*args: str) -> float:
    """`glmrt ARGS` through its CLI (so any option it gains works here): its seconds; a failure
    stops the run with the CLI's output."""
    cmd = [sys.executable, "-c", "from glmrt.cli import main; main()", *args]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"glmrt {shlex.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.perf_counter() - t


def glmrt_export(ckpt: Path, out: Path, args: str) -> tuple[Path, float]:
    """`glmrt export CKPT -o OUT --overwrite ARGS`."""
    return out, glmrt_cli("export", str(ckpt), "-o", str(out), "--overwrite", *shlex.split(args))


def glmrt_build(folder: Path, backend: str) -> float:
    """`glmrt build FOLDER --backend BACKEND`: its seconds."""
    return glmrt_cli("build", str(folder), "--backend", backend)


def time_glmrt(folder: Path, *, threads: int, prompts, context: int, steps: int, repeats: int,
               tbps: float, backend: str = "onnxruntime") -> dict:
    from glmrt.benchmark import bench
    r = bench(folder, device="cpu", backend=backend, prompt_lengths=list(prompts), contexts=[context],
              decode_steps=steps, repeats=repeats, threads=threads, bandwidth_tbps=tbps)
    d = r["decode"][context]
    gc.collect()                     # the session (and its spinning thread pool) goes before the next run
    return {"prefill": {int(n): v for n, v in r["prefill"].items()},
            "decode": {"context": context, "ms": d["ms"], "tok_s": d["tok_s"]},
            "bytes_per_token": r.get("ceiling", {}).get("bytes_per_token"),
            "ort_settings": r.get("ort_settings"), "form": r["form"]}


# ---- the run --------------------------------------------------------------------------------
def hardware() -> dict:
    from glmrt.host import available_bytes, physical_cores
    model = None
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "logical_cpus": os.cpu_count(),
            "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "physical_cores": physical_cores(), "memory_bytes": mem, "memory_available_bytes": available_bytes(),
            "loadavg_at_start": os.getloadavg()}


def software() -> dict:
    import gguf  # noqa: F401
    import llama_cpp
    import onnxruntime
    from importlib.metadata import version
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"],
                                capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"python": platform.python_version(), "glmrt_commit": commit, "onnxruntime": onnxruntime.__version__,
            "llama_cpp_python": llama_cpp.__version__, "gguf": version("gguf"),
            "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def parameter_count(sizes: dict) -> int:
    from glmrt.config import GlmConfig
    from glmrt.export.checkpoint import expected_tensors
    from glmrt.export.synthetic import hf_config
    cfg = GlmConfig.from_hf(hf_config(sizes, [0], 0))
    return int(sum(np.prod(s) for s in expected_tensors(cfg).values()))


def disk_plan(params: int, have_ckpt: bool) -> int:
    """Peak bytes the run writes: checkpoint (bf16) + F16 + Q8_0 + Q4_0 GGUFs + the largest
    glmrt export (fp32), each deleted when its pair is timed."""
    return int((0 if have_ckpt else 2 * params) + params * (2 + 1.07 + 0.6) + 4 * params)


def checkpoint(work: Path, sizes: dict, seed: int) -> Path:
    from glmrt.export.synthetic import make_checkpoint
    ckpt = work / "checkpoint"
    cfg = ckpt / "config.json"
    if cfg.is_file():
        have = json.loads(cfg.read_text())
        if all(have.get(k) == v for k, v in sizes.items()) and (ckpt / "model.safetensors.index.json").is_file():
            print(f"reusing {ckpt}", flush=True)
            return ckpt
    print(f"writing the checkpoint {ckpt} (random bf16 weights, seed {seed})", flush=True)
    return make_checkpoint(ckpt, sizes, seed=seed, overwrite=True)


def pair_rows(rows: list[dict]) -> None:
    """Each glmrt row: ratios to the faster llama.cpp setting of its pair, per figure."""
    for r in rows:
        if r["engine"] != "glmrt":
            continue
        peers = [p for p in rows if p["engine"] == "llama.cpp" and p["gguf"] == r["pair"] and p["threads"] == r["threads"]]
        if not peers:
            continue
        ratio = {"decode": r["decode"]["tok_s"] / max(p["decode"]["tok_s"] for p in peers)}
        for n, v in r["prefill"].items():
            ratio[f"pp{n}"] = v["tok_s"] / max(p["prefill"][n]["tok_s"] for p in peers)
        r["ratio"] = ratio
        goal = GOAL.get(r["precision"])
        if goal:
            r["goal"] = {k: {"want": goal["decode" if k == "decode" else "prefill"],
                             "met": v >= goal["decode" if k == "decode" else "prefill"]} for k, v in ratio.items()}


def ceiling_rows(result: dict) -> None:
    """Each row's % of ceiling against the higher of the copy rates measured at the start and the
    end with its threads (result["ceiling_gbps"]); above 100%: marked "ceiling_low"."""
    start, end = result["copy_rate_gbps"], result.get("copy_rate_gbps_end", {})
    result["ceiling_gbps"] = {t: max(v, end.get(t, 0.0)) for t, v in start.items()}
    for r in result["rows"]:
        if r.get("bytes_per_token"):
            tbps = result["ceiling_gbps"][r["threads"]] / 1e3
            r["pct_of_ceiling"] = 100 * (r["bytes_per_token"] / (tbps * 1e12)) / (r["decode"]["ms"] / 1e3)
            r["ceiling_low"] = r["pct_of_ceiling"] > 100


def markdown(result: dict) -> str:
    rows, prompts = result["rows"], result["settings"]["prompt_lengths"]
    ctx = result["settings"]["context"]
    head = (["threads", "engine", "weights", f"decode tok/s (ctx {ctx})", "% of ceiling"]
            + [f"pp{n} tok/s" for n in prompts] + ["glmrt / llama.cpp: decode, " + ", ".join(f"pp{n}" for n in prompts),
                                                   "goal (issue 14)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["threads"], ORDER.index(r["pair"] if r["engine"] == "glmrt" else r["gguf"]),
                                         r["engine"] != "llama.cpp", r.get("flash_attn", False))):
        ratio = r.get("ratio")
        ratios = " / ".join(f"{ratio[k]:.2f}" for k in ["decode"] + [f"pp{n}" for n in prompts]) if ratio else ""
        goal = r.get("goal")
        goals = ", ".join(f"{k} ≥{g['want']}: {'met' if g['met'] else 'missed'}" for k, g in goal.items()) if goal else ""
        lines.append("| " + " | ".join([str(r["threads"]), r["engine"], r["label"], f"{r['decode']['tok_s']:.1f}",
                                         (f"{r['pct_of_ceiling']:.0f}%" + (" (ceiling measured low)" if r.get("ceiling_low") else ""))
                                         if r.get("pct_of_ceiling") else "–"]
                                        + [f"{r['prefill'][n]['tok_s']:.1f}" for n in prompts] + [ratios, goals]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a small model: the whole pipeline in minutes")
    ap.add_argument("--check", action="store_true", help="only the GGUF conversion check")
    ap.add_argument("--no-check", action="store_true", help="skip the conversion check before timing")
    ap.add_argument("--workdir", default="/tmp/llama-work/bench", help="checkpoint, GGUFs and exports go here")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint, GGUFs and exports (reruns reuse "
                                                        "the checkpoint and GGUFs)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-lengths", default="128,512")
    ap.add_argument("--context", type=int, default=128, help="decode after this many tokens")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="prefill repeats (default 5; 3 with --small)")
    ap.add_argument("--glmrt", action="append", default=None, metavar="LABEL[@cpu]=OPTIONS",
                    help="a glmrt export to time: a label and `glmrt export` options, e.g. "
                         "'int4=--precision int4' (repeat; default: fp32, int8, int4 with glmrt's defaults); "
                         "LABEL@cpu: `glmrt build --backend cpu` on the export and time glmrt's cpu engine "
                         "(export with --target cpu)")
    ap.add_argument("--llama", default="q4_0,q8_0,f16", help="llama.cpp files to time (besides those paired)")
    ap.add_argument("--flash-attn", choices=["off", "on", "both"], default="both")
    ap.add_argument("--converter", default=None, metavar="LLAMA_CPP_DIR",
                    help="with --check: also compare with llama.cpp's convert_hf_to_gguf.py from this "
                         "source tree (needs torch and transformers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here (default: WORKDIR/vs_llama_cpp.json)")
    args = ap.parse_args(argv)

    check_mod = sibling("gguf_check")
    gx = sibling("gguf_export")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.check:
        r = check_mod.check(work / "check", converter=args.converter)
        print(check_mod.format_check(r))
        (work / "gguf_check.json").write_text(json.dumps(r, indent=2))
        return 0 if r["passed"] else 1

    from glmrt.host import copy_rate_gbps
    threads = [int(t) for t in args.threads.split(",")]
    prompts = [int(n) for n in args.prompt_lengths.split(",")]
    repeats = args.repeats or (3 if args.small else 5)
    sizes = SMALL_SIZES if args.small else ISSUE_SIZES
    fa = {"off": [False], "on": [True], "both": [False, True]}[args.flash_attn]
    sets = []
    for spec in args.glmrt or DEFAULT_GLMRT:
        label, _, opts = spec.partition("=")
        label, _, backend = label.partition("@")             # LABEL@cpu: built and run on glmrt's cpu engine
        if backend not in ("", "onnxruntime", "cpu"):
            raise SystemExit(f"--glmrt {spec!r}: backend {backend!r}; expected onnxruntime or cpu")
        prec = export_precision(opts)
        if any(x["label"] == label and x["backend"] == (backend or "onnxruntime") for x in sets):
            raise SystemExit(f"--glmrt {spec!r}: the label {label!r} is given twice")
        sets.append({"label": label, "options": opts, "precision": prec, "pair": PAIR.get(prec, "f16"),
                     "backend": backend or "onnxruntime"})
    wanted = {k for k in args.llama.split(",") if k} | {s["pair"] for s in sets}
    if wanted - set(LLAMA_LABEL):
        raise SystemExit(f"--llama: unknown {sorted(wanted - set(LLAMA_LABEL))}; choose from {list(LLAMA_LABEL)}")

    params = parameter_count(sizes)
    need = disk_plan(params, (work / "checkpoint" / "config.json").is_file())
    free = shutil.disk_usage(work).free
    print(f"model: {params / 1e9:.3f}B parameters; this run writes up to {need / 1e9:.1f} GB in {work} "
          f"({free / 1e9:.0f} GB free)", flush=True)
    if need > 0.9 * free:
        raise SystemExit("not enough free disk: pass --workdir on a larger disk")

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.1f} before the run: other work shares these cores, the figures "
              "are noisy (llama.cpp's multi-thread figures collapse when its threads are descheduled)", flush=True)
    result = {"issue": 14, "noisy": load > 0.5, "hardware": hardware(), "software": software(), "sizes": sizes, "parameters": params,
              "settings": {"threads": threads, "prompt_lengths": prompts, "context": args.context,
                           "decode_steps": args.decode_steps, "decode_warmup": WARMUP, "repeats": repeats,
                           "flash_attn": args.flash_attn, "small": args.small, "seed": args.seed},
              "rows": []}
    t_run = time.perf_counter()
    if not args.no_check:
        r = check_mod.check(work / "check", controls=False)
        print(check_mod.format_check(r), flush=True)
        result["check"] = r
        shutil.rmtree(work / "check", ignore_errors=True)
        if not r["passed"]:
            raise SystemExit("the GGUF conversion check failed: the comparison would not be of the same model")

    result["copy_rate_gbps"] = {t: copy_rate_gbps(t) for t in threads}
    print("host memory copy rate: " + ", ".join(f"{v:.1f} GB/s ({t} thread{'s' * (t > 1)})"
                                                 for t, v in result["copy_rate_gbps"].items()), flush=True)
    t = time.perf_counter()
    ckpt = checkpoint(work, sizes, args.seed)
    result["checkpoint_s"] = time.perf_counter() - t
    f16 = work / "model-f16.gguf"
    files = {"f16": f16, "q8_0": work / "model-q8_0.gguf", "q4_0": work / "model-q4_0.gguf"}
    stamp = (ckpt / "config.json").stat().st_mtime
    result["gguf"] = {}
    for kind in [k for k in ORDER[::-1] if k in wanted | {"f16"}]:   # f16 first: the others are made from it
        path = files[kind]
        if path.is_file() and path.stat().st_mtime >= stamp:
            print(f"reusing {path}", flush=True)
            secs = None
        else:
            t = time.perf_counter()
            gx.write_gguf(ckpt, path) if kind == "f16" else gx.quantize(f16, path, kind)
            secs = time.perf_counter() - t
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {secs:.0f} s)", flush=True)
        result["gguf"][kind] = {**describe_gguf(path), "made_s": secs}

    out_json = Path(args.json) if args.json else work / "vs_llama_cpp.json"
    for kind in [k for k in ORDER if k in wanted]:
        group = [s for s in sets if s["pair"] == kind]
        for s in group:
            print(f"glmrt export {s['options']} ...", flush=True)
            where = work / (f"glmrt-{s['label']}" + ("" if s["backend"] == "onnxruntime" else f"-{s['backend']}"))
            s["folder"], s["export_s"] = glmrt_export(ckpt, where, s["options"])
            if s["backend"] == "cpu":
                s["build_s"] = glmrt_build(s["folder"], "cpu")
            man = json.loads((s["folder"] / "manifest.json").read_text())
            if man["precision"]["name"] != s["precision"]:
                raise SystemExit(f"{s['folder']}: manifest precision {man['precision']['name']!r}, "
                                 f"expected {s['precision']!r}")
            s["manifest_precision"] = man["precision"]
            s["bytes"] = sum(f.stat().st_size for f in s["folder"].iterdir() if f.is_file())
        info = result["gguf"][kind]
        for t in threads:
            tbps = result["copy_rate_gbps"][t] / 1e3
            for flash in fa:
                print(f"llama.cpp {LLAMA_LABEL[kind]}, {t} thread(s), flash attention {'on' if flash else 'off'} ...",
                      flush=True)
                r = time_llama(files[kind], threads=t, prompts=prompts, context=args.context,
                               steps=args.decode_steps, repeats=repeats, flash_attn=flash)
                bpt = gguf_bytes_per_token(info)
                r.update(engine="llama.cpp", gguf=kind, threads=t, bytes_per_token=bpt,
                         label=f"{LLAMA_LABEL[kind]} (flash attn {'on' if flash else 'off'})",
                         pct_of_ceiling=100 * (bpt / (tbps * 1e12)) / (r["decode"]["ms"] / 1e3),
                         loadavg=os.getloadavg())
                result["rows"].append(r)
                print(f"  decode {r['decode']['tok_s']:.1f} tok/s; " + ", ".join(
                    f"pp{n} {v['tok_s']:.1f} tok/s" for n, v in r["prefill"].items()), flush=True)
            for s in group:
                print(f"glmrt {s['label']}, {t} thread(s) ...", flush=True)
                r = time_glmrt(s["folder"], threads=t, prompts=prompts, context=args.context,
                               steps=args.decode_steps, repeats=repeats, tbps=tbps, backend=s["backend"])
                r.update(engine="glmrt", label=s["label"] + ("" if s["backend"] == "onnxruntime" else f" @{s['backend']}"),
                         options=s["options"], precision=s["precision"], backend=s["backend"],
                         pair=kind, threads=t, manifest_precision=s["manifest_precision"],
                         export_s=s["export_s"], export_bytes=s["bytes"], loadavg=os.getloadavg())
                if r["bytes_per_token"]:
                    r["pct_of_ceiling"] = 100 * (r["bytes_per_token"] / (tbps * 1e12)) / (r["decode"]["ms"] / 1e3)
                result["rows"].append(r)
                print(f"  decode {r['decode']['tok_s']:.1f} tok/s; " + ", ".join(
                    f"pp{n} {v['tok_s']:.1f} tok/s" for n, v in r["prefill"].items()), flush=True)
            out_json.write_text(json.dumps(result, indent=2, default=str))       # partial results survive
        if not args.keep:
            for s in group:
                shutil.rmtree(s["folder"], ignore_errors=True)
            if kind != "f16":
                files[kind].unlink(missing_ok=True)
    if not args.keep:
        f16.unlink(missing_ok=True)
        shutil.rmtree(ckpt, ignore_errors=True)

    pair_rows(result["rows"])
    result["copy_rate_gbps_end"] = {t: copy_rate_gbps(t) for t in threads}
    ceiling_rows(result)
    result["hardware"]["loadavg_at_end"] = os.getloadavg()
    result["run_s"] = time.perf_counter() - t_run
    import resource
    result["peak_rss_bytes"] = {"this process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                "glmrt export (largest)": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    table = markdown(result)
    out_json.write_text(json.dumps(result, indent=2, default=str))
    hw = result["hardware"]
    print(f"\n{'NOISY RUN (load average above 0.5 at the start): ' if result['noisy'] else ''}"
          f"{hw['cpu']}, {hw['physical_cores']} physical cores ({hw['cpus_allowed']} CPUs allowed); "
          f"load average {hw['loadavg_at_start'][0]:.2f} at the start, {hw['loadavg_at_end'][0]:.2f} at the end; "
          f"{params / 1e9:.3f}B parameters; run {result['run_s'] / 60:.1f} min; peak memory "
          f"{result['peak_rss_bytes']['this process'] / 1e9:.1f} GB (exports "
          f"{result['peak_rss_bytes']['glmrt export (largest)'] / 1e9:.1f} GB)")
    print("host memory copy rate at the start / end: " + ", ".join(
        f"{result['copy_rate_gbps'][t]:.1f} / {result['copy_rate_gbps_end'][t]:.1f} GB/s ({t} thread{'s' * (t > 1)})"
        for t in threads))
    print(table)
    print(f"\nJSON: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
