"""`glmrt export | chat | serve | info | tiny | ...`: each command calls one library function.

glmrt's own errors print as one line (`error: ...`) with exit status 2, never a traceback.
"""
from __future__ import annotations

import functools
import json
import sys

import click

from .backends import BACKENDS, DEVICES
from .contract import CONSUMERS
from .errors import GlmrtError
from .model import DEFAULT_MAX_NEW_TOKENS
from .precision import PRECISIONS, TARGETS, names


def clean_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GlmrtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:          # disk full, permissions: name the file, no traceback
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(2)
    return wrapper


@click.group()
@click.version_option(package_name="glmrt")
def main():
    """glmrt: export GLM-4-0414 checkpoints to ONNX and run them without torch."""


@main.command()
@click.argument("checkpoint")
@click.option("-o", "--out", required=True, type=click.Path(), help="Model folder to write.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
              help="; ".join(f"{n}: targets {', '.join(p.forms)}" for n, p in PRECISIONS.items()) + ".")
@click.option("--target", type=click.Choice(list(TARGETS)), default="onnxruntime", show_default=True,
              help="The graph form: " + "; ".join(f"{n}: {t.what}" for n, t in TARGETS.items()) + ".")
@click.option("--block-size", type=int, default=None,
              help="int4/int8 block along K (default 32 for onnxruntime, 128 for tensorrt int4).")
@click.option("--asymmetric", is_flag=True, help="int4/int8 with zero points (onnxruntime only).")
@click.option("--activations", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Activation dtype of quantized forms (default fp32 onnxruntime, fp16 tensorrt).")
@click.option("--lm-head", type=click.Choice(["float", "int8", "int4"]), default=None,
              help="Quantized exports: lm_head as float or MatMulNBits int8/int4 (default, for MatMulNBits "
                   "weights: " + "; ".join(f"{n} {t.lm_head.replace('same', 'the weights bits')}"
                                           for n, t in TARGETS.items()) + "; float for other forms).")
@click.option("--quantize-lm-head", is_flag=True, help="lm_head in the weights' own form (instead of --lm-head).")
@click.option("--int8-activations/--float-activations", default=None,
              help="int4/int8 MatMulNBits: multiply int8-quantized activations (ONNX Runtime's "
                   "accuracy_level 4, CPU) or dequantize to float (default: int8 on the onnxruntime "
                   "target).")
@click.option("--calibration-prompts", default=32, show_default=True,
              help="Calibration prompts (FP8 activation scales, --awq).")
@click.option("--awq", is_flag=True, help="int4/int8: activation-aware scale search (slower).")
@click.option("--float-layout", type=click.Choice(["kn", "nk"]), default="kn", show_default=True,
              help="Target cuda, float weights: W^T for MatMul (kn) or as stored, FusedMatMul transB (nk).")
@click.option("--for", "consumers", type=click.Choice(list(CONSUMERS)), multiple=True,
              help="Also write the folder for another runtime (repeatable): "
                   + "; ".join(f"{n}: {c.what}" for n, c in CONSUMERS.items()) + ".")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it is a model folder glmrt exported (never the checkpoint, never "
                   "a folder holding other files).")
@clean_errors
def export(checkpoint, out, precision, target, block_size, asymmetric, activations, lm_head,
           quantize_lm_head, int8_activations, calibration_prompts, awq, float_layout, consumers,
           overwrite):
    """Export a Hugging Face GLM-4-0414 CHECKPOINT folder to an ONNX model folder."""
    from glmrt.export.export import export_model
    path = export_model(checkpoint, out, precision=precision, target=target, block_size=block_size,
                        symmetric=not asymmetric, activations=activations,
                        quantize_lm_head=quantize_lm_head, lm_head=lm_head,
                        int8_activations=int8_activations, calibration_prompts=calibration_prompts,
                        awq=awq, float_layout=float_layout, consumers=consumers, overwrite=overwrite)
    also = f"; also for {', '.join(consumers)}" if consumers else ""
    click.echo(f"exported {checkpoint} -> {path} ({precision}, {target}{also})")


@main.command()
@click.argument("out", type=click.Path())
@click.option("--seed", default=0, show_default=True)
@click.option("--shape", type=click.Choice(["tiny", "glm-z1-9b", "glm-4-32b"]), default="tiny",
              show_default=True, help="Real shapes write 19 / 65 GB of random bf16 weights.")
@click.option("--shards", default=2, show_default=True)
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it holds a checkpoint this command wrote (and nothing else).")
@clean_errors
def tiny(out, seed, shape, shards, overwrite):
    """Write a random-weight GLM-4-0414 checkpoint with the real file layout (tiny by default)."""
    from glmrt.export.synthetic import SHAPES, make_checkpoint
    click.echo(f"wrote {make_checkpoint(out, SHAPES[shape], seed=seed, shards=shards, overwrite=overwrite)}")


def load_options(default_device: str | None = None):
    """--backend, --device, --threads: the same on every command that loads a model."""
    def add(fn):
        for opt in reversed([
            click.option("--backend", type=click.Choice(list(BACKENDS)), default="onnxruntime",
                         show_default=True, help="What runs the model (glmrt/backends)."),
            click.option("--device", type=click.Choice(list(DEVICES)), default=default_device,
                         show_default=default_device is not None,
                         help="Default: " + (default_device or "the best one present")
                         + " (the backend's first device where it has one)."),
            click.option("--threads", type=click.IntRange(min=1), default=None,
                         help="CPU threads (default: the physical cores)."),
        ]):
            fn = opt(fn)
        return fn
    return add


def sampling_options(fn):
    for opt in reversed([
        click.option("--max-new-tokens", default=DEFAULT_MAX_NEW_TOKENS, show_default=True),
        click.option("--temperature", default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, help="0 = off."),
        click.option("--top-p", default=1.0, show_default=True),
        click.option("--repetition-penalty", default=1.0, show_default=True),
        click.option("--seed", default=None, type=int),
    ]):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--prompt", default=None, help="Answer one prompt and exit.")
@click.option("--system", default=None, help="System message.")
@load_options()
@click.option("--hide-reasoning", is_flag=True, help="Do not show GLM-Z1's reasoning.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the model files' checksums on load.")
@click.option("--truncate", is_flag=True, help="Drop the oldest turns when the chat outgrows the context.")
@sampling_options
@clean_errors
def chat(model, prompt, system, backend, device, threads, hide_reasoning, verify, truncate, **sampling):
    """Chat with an exported MODEL folder (streaming). Empty line or Ctrl-D quits; Ctrl-C
    stops the reply being written and keeps what was written so far."""
    import warnings

    import glmrt
    from .errors import ContextOverflowError, InputError, TruncationWarning
    if prompt is not None and not prompt.strip():
        raise InputError("--prompt is empty; give the text to answer (or leave --prompt out to chat)")
    if sampling["max_new_tokens"] < 1:
        raise InputError(f"--max-new-tokens {sampling['max_new_tokens']}: must be at least 1")
    m = glmrt.load(model, backend=backend, device=device, threads=threads, verify=verify)
    glmrt.SamplingParams(sampling["temperature"], sampling["top_k"], sampling["top_p"],
                         sampling["repetition_penalty"], sampling["seed"])   # fail before the first turn
    history = [{"role": "system", "content": system}] if system else []

    def note(text):
        click.echo(click.style(f"[{text}]", dim=True), err=True)

    def turn(text):
        history.append({"role": "user", "content": text})
        content, kind = [], None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncationWarning)
            try:
                for d in m.chat_stream(history, truncate=truncate, **sampling):
                    for w in caught:
                        note(f"note: {w.message}")
                    caught.clear()
                    if d.kind == "reasoning" and not hide_reasoning:
                        click.echo(click.style(d.text, dim=True, italic=True), nl=False)
                    elif d.kind == "content":
                        if kind == "reasoning" and not hide_reasoning:
                            click.echo("\n")
                        content.append(d.text)
                        click.echo(d.text, nl=False)
                    elif d.kind == "done":
                        for c in d.message.get("tool_calls", []):
                            click.echo(f"[tool call] {c['function']['name']} {c['function']['arguments']}"
                                       + (f"  ({c['error']})" if c.get("error") else ""), nl=False)
                        if d.message["finish_reason"] == "length":
                            click.echo()
                            n = d.usage["completion_tokens"]
                            note(f"the reply stopped at --max-new-tokens {n}" if n >= sampling["max_new_tokens"]
                                 else f"the reply stopped after {n} tokens: the context "
                                      f"({m.max_context} tokens) is full")
                    kind = d.kind if d.kind != "done" else kind
            except KeyboardInterrupt:
                click.echo(" [interrupted]", nl=False)
            except ContextOverflowError as e:
                raise InputError(e.cli_message()) from None
        click.echo()
        history.append({"role": "assistant", "content": "".join(content)})

    if prompt is not None:
        turn(prompt)
        return
    p = m.manifest["precision"]
    d = m.decoder.describe()
    click.echo(f"glmrt chat: {m.folder} ({p['name']}, {m.config.num_hidden_layers} layers, "
               f"context {m.max_context}) on {d['backend']}/{d['device']}. Empty line or Ctrl-D quits; "
               "Ctrl-C stops a reply.", err=True)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        except UnicodeDecodeError:
            click.echo("error: that line is not valid UTF-8; type it again", err=True)
            continue
        if not text.strip():
            return
        try:
            turn(text)
        except GlmrtError as e:      # a bad turn is reported; the conversation goes on
            history.pop()
            click.echo(f"error: {e}", err=True)


@main.command()
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback unless you say otherwise).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="0 picks a free port (printed at start).")
@load_options()
@click.option("--slots", default=4, show_default=True, type=click.IntRange(min=1),
              help="Generations decoded at once.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait for a slot; one more is answered 429.")
@click.option("--api-key", envvar="GLMRT_API_KEY", default=None,
              help="Require Authorization: Bearer KEY on every route but /health (or set GLMRT_API_KEY).")
@click.option("--name", default=None, help="The model id clients send (default: the folder's name).")
@click.option("--grace", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds in-flight replies may run on after SIGTERM before they are cut.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the model files' checksums on load.")
@click.option("--ray", "on_ray", is_flag=True,
              help="Run on Ray Serve: replicas of the model behind Ray's proxy (the ray extra).")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="--ray: this many replicas (default 1), or autoscale with --min/--max-replicas.")
@click.option("--min-replicas", type=click.IntRange(min=0), default=None, help="--ray: autoscaling's lower bound.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="--ray: autoscaling's upper bound.")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=None,
              help="--ray: GPUs each replica reserves (default 0; 1: one replica per GPU).")
@click.option("--cpus-per-replica", type=click.FloatRange(min=0), default=None,
              help="--ray: CPUs each replica reserves (default 1; on the CPU, also its threads).")
@click.option("--router-queue", type=click.IntRange(min=-1), default=None,
              help="--ray: requests (at least 1) that may wait at each Ray proxy while every replica is full "
                   "(default 64; beyond: 429; -1: no bound).")
@click.option("--ray-address", default=None,
              help="--ray: the cluster to join ('auto': the one this machine is in; default: start one here).")
@clean_errors
def serve(model, host, port, backend, device, threads, slots, max_queue, api_key, name, grace, verify,
          on_ray, replicas, min_replicas, max_replicas, gpus_per_replica, cpus_per_replica, router_queue, ray_address):
    """Serve an exported MODEL with an OpenAI-compatible API and a chat page (needs the serve
    extra: pip install "glmrt[serve]"; --ray needs the ray extra)."""
    ray_only = {k: v for k, v in dict(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                                      gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
                                      router_queue=router_queue, ray_address=ray_address).items() if v is not None}
    if not on_ray:
        if ray_only:
            flags = ", ".join("--" + k.replace("_", "-") for k in ray_only)
            raise GlmrtError(f"{flags}: only with --ray (glmrt serve MODEL --ray ...)")
        try:
            from .serve.run import serve as run_server
        except ImportError as e:
            raise GlmrtError(f"glmrt serve needs the serve extra ({e.name} is missing): "
                             'pip install "glmrt[serve]"') from None
        run_server(model=model, host=host, port=port, backend=backend, device=device, threads=threads,
                   slots=slots, max_queue=max_queue, api_key=api_key, name=name, grace=grace, verify=verify)
        return
    try:
        from .serve.ray_app import serve_on_ray
    except ImportError as e:
        raise GlmrtError(f"glmrt serve --ray needs the ray extra ({e.name} is missing): "
                         'pip install "glmrt[serve,ray]"') from None
    serve_on_ray(host=host, port=port, model=model, name=name, backend=backend, device=device, threads=threads,
                 slots=slots, max_queue=max_queue, api_key=api_key, verify=verify, grace=grace, **ray_only)


@main.command()
@click.argument("model", type=click.Path(file_okay=False))
@load_options()
@click.option("--prompt-lengths", default=None,
              help="Prefill these prompt lengths (default 128,512,2048: those the model holds).")
@click.option("--contexts", default=None,
              help="Decode at these context lengths (default 128,2048,8192: those the model holds).")
@click.option("--decode-steps", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--bandwidth-tbps", type=float, default=None,
              help="The memory-bandwidth ceiling (default: measured on the CPU, known per GPU).")
@click.option("--no-cuda-graph", is_flag=True)
@click.option("--burst", type=click.IntRange(min=1), default=None,
              help="Greedy steps per host synchronization (default: 8 on cuda, 1 on cpu).")
@click.option("--slots", "slot_counts", default=None,
              help="Continuous batching instead: decode this many sequences together, e.g. 1,2,4,8 "
                   "(at the first --contexts value, default 128).")
@click.option("--json", "as_json", type=click.Path(), default=None, help="Also write the figures here.")
@clean_errors
def bench(model, backend, device, threads, prompt_lengths, contexts, decode_steps, repeats, bandwidth_tbps,
          no_cuda_graph, burst, slot_counts, as_json):
    """Time an exported MODEL: first token, prefill, decode, memory, % of the bandwidth ceiling
    (or, with --slots, batched decode)."""
    from pathlib import Path

    from .benchmark import bench as run_bench
    from .benchmark import bench_slots, format_report, format_slots, to_json
    if slot_counts is not None:
        ctx = _token_counts(contexts, "contexts")
        r = bench_slots(model, _token_counts(slot_counts, "slots"), backend=backend, device=device,
                        threads=threads, context=ctx[0] if ctx else 128, decode_steps=min(decode_steps, 32),
                        repeats=repeats, cuda_graph=not no_cuda_graph)
        click.echo(format_slots(r))
        if as_json:
            Path(as_json).write_text(to_json(r))
        return
    r = run_bench(model, backend=backend, device=device, threads=threads,
                  prompt_lengths=_token_counts(prompt_lengths, "prompt-lengths"),
                  contexts=_token_counts(contexts, "contexts"), decode_steps=decode_steps,
                  repeats=repeats, bandwidth_tbps=bandwidth_tbps, cuda_graph=not no_cuda_graph, burst=burst)
    click.echo(format_report(r))
    if as_json:
        Path(as_json).write_text(to_json(r))


def _token_counts(text: str | None, name: str):
    """'128,512' -> [128, 512]; None stays None (the defaults)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise GlmrtError(f"--{name} {text!r}: expected comma-separated token counts, like 128,512") from None


@main.command()
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice([n for n, b in BACKENDS.items() if b.builder]),
              default="tensorrt", show_default=True)
@click.option("--gpu", default="auto", show_default=True, help="auto, or NAME@smXY.")
@click.option("--precision", type=click.Choice(names(backend="tensorrt")), default=None,
              help="Must match the exported model's (default: the model's).")
@click.option("--device", type=click.Choice(list(DEVICES)), default="cuda", show_default=True,
              help="onnxruntime backend: which provider to optimize for.")
@click.option("--max-batch", default=1, show_default=True,
              help="Sequences one engine step takes: TensorRT's profile; the cuda engine's batched slots (up to 8).")
@click.option("--max-prompt", default=2048, show_default=True)
@click.option("--max-context", default=4096, show_default=True)
@click.option("--opt-level", default=3, show_default=True, help="TensorRT builder optimization level 0-5.")
@click.option("--activations", type=click.Choice(["int8", "fp16"]), default=None,
              help="cuda backend, int4 models: what the weights multiply: fp16 x (default, as ONNX Runtime's "
                   "form) or int8 x per 32 values (faster, less accurate).")
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="cuda backend: time launch-parameter candidates on the GPU (when it is the one built for) "
                   "and keep the fastest; --no-tune keeps the defaults.")
@click.option("--isa", type=click.Choice(["auto", "avx512vnni", "avxvnni", "avx2", "generic"]), default="auto",
              show_default=True,
              help="cpu backend: the instruction set to compile for (auto: the best this CPU runs).")
@click.option("--overwrite", is_flag=True)
@clean_errors
def build(model, backend, gpu, precision, device, max_batch, max_prompt, max_context, opt_level, activations,
          tune, isa, overwrite):
    """Build an engine for one backend from an exported MODEL folder (stored inside it)."""
    from glmrt.engines.build import build as run_build
    out = run_build(model, backend=backend, precision=precision, overwrite=overwrite, gpu=gpu, device=device,
                    max_batch=max_batch, max_prompt=max_prompt, max_context=max_context, opt_level=opt_level,
                    activations=activations, isa=isa, **({} if tune else {"tune": False}))
    click.echo(f"built {out}")


@main.command(name="eval")
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False),
              help="UTF-8 text to score.")
@click.option("--window", default=512, show_default=True, help="Tokens per scoring window.")
@load_options()
@clean_errors
def evaluate(model, text_file, window, backend, device, threads):
    """Perplexity of a text under an exported MODEL (through the runtime's own logits)."""
    from pathlib import Path

    import glmrt

    from .evaluate import perplexity
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise glmrt.InputError(f"{text_file}: cannot read as UTF-8 text ({e})") from None
    r = perplexity(glmrt.load(model, backend=backend, device=device, threads=threads), text, window=window)
    if r["window"] < r["window_asked"]:
        click.echo(f"warning: --window {r['window_asked']} is longer than the model's context; "
                   f"scored in windows of {r['window']}", err=True)
    click.echo(f"perplexity {r['perplexity']:.3f} over {r['tokens']} tokens (window {r['window']}; "
               f"a uniform guess over the vocabulary scores {r['vocab_size']})")


@main.command()
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--verify/--no-verify", default=False, help="Check every file's checksum.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (and engines) as JSON.")
@click.option("--load", is_flag=True, help="Also load the model with --backend/--device and show what "
                                           "its decoder can do.")
@load_options()
@clean_errors
def info(model, verify, as_json, load, backend, device, threads):
    """Show what an exported MODEL folder's manifest says (and, with --load, its decoder)."""
    import dataclasses
    from pathlib import Path

    from . import manifest
    m = manifest.read(Path(model), verify=verify)
    runs = None
    if load:
        import glmrt
        dec = glmrt.load(model, backend=backend, device=device, threads=threads, verify=False).decoder
        runs = {**dec.describe(), "capabilities": dataclasses.asdict(dec.caps)}
    engines = {str(p.parent.relative_to(model)): json.loads(p.read_text())
               for p in sorted(Path(model).glob("engines/*/*/manifest.json"))}
    if as_json:
        click.echo(json.dumps({"model": str(model), "checksums_verified": verify, "manifest": m,
                               "engines": engines, "decoder": runs}, indent=2, ensure_ascii=False))
        return
    c, p = m["config"], m["precision"]
    q = p.get("quantization") or {}
    click.echo(f"model      {model}")
    click.echo(f"layers     {c['num_hidden_layers']}  hidden {c['hidden_size']}  heads "
               f"{c['num_attention_heads']}/{c['num_key_value_heads']}  head_dim {c['head_dim']}  "
               f"vocab {c['vocab_size']}  context {c['max_position_embeddings']}")
    click.echo(f"form       {m['io']['form']} (target {p['target']})")
    click.echo(f"precision  {p['name']}: weights {p['weights']}, compute {p['compute']}, kv {p['kv']}")
    if q:
        click.echo(f"quantized  {q['form']} {q['bits']}-bit" + (f", block {q['block_size']}" if "block_size" in q else "")
                   + (", symmetric" if q.get("symmetric") else "") + f", scales {q['scale_dtype']}"
                   + (", int8 activations" if q.get("int8_activations") else "")
                   + f"; mean weight error {q['mean_rel_rmse']:.4f}")
        head = q.get("lm_head_form")
        click.echo(f"lm_head    {q['lm_head']}" + (f" ({head['form']} {head['bits']}-bit)" if head else "")
                   + f"; embedding {q['embed_tokens']}")
        if "method" in q:
            click.echo(f"method     {q['method']}")
    click.echo(f"stop ids   {m['generation']['eos_token_id']}")
    click.echo(f"template   {m['chat_template']}")
    for name, rec in m.get("consumers", {}).items():      # folders from before export --for: none
        click.echo(f"also for   {name}: {rec['graph']} + {rec['config']}")
    click.echo("made by    " + "  ".join(f"{k} {v}" for k, v in m["versions"].items()))
    size = sum(f["bytes"] for f in m["files"].values())
    click.echo(f"files      {len(m['files'])}, {size / 1e6:.1f} MB" + ("  (checksums OK)" if verify else ""))
    for where, em in engines.items():
        click.echo(f"engine     {where}  {em.get('kind')}"
                   + (f"  TensorRT {em['tensorrt']}" if em.get("tensorrt") else ""))
    if runs:
        caps = "  ".join(f"{k} {v}" for k, v in runs["capabilities"].items())
        click.echo(f"decoder    {runs['backend']}/{runs['device']} ({runs['form']} form)  {caps}")


if __name__ == "__main__":
    main()
