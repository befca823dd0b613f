#!/usr/bin/env bash
# Everything glmrt measures on the GPU machine, one stage per call (a call runs at most 10 min):
#   bash bench/gpu.sh chunk K        copy .gpu/partK (carried) to /tmp/chunks; with K=0 also `prep`
#   bash bench/gpu.sh prep           install glmrt (and carried .whl/ wheels) and start the exports
#                                    the later stages use, in the background (setsid): they run on
#                                    while the wheel parts travel (EXPORTS="9b-int4 9b-fp16")
#   bash bench/gpu.sh install        join the onnxruntime-gpu wheel parts in /tmp/chunks, install
#   bash bench/gpu.sh tests          the GPU tests (logits vs CPU fp32, greedy agreement)
#   bash bench/gpu.sh ncu            Nsight Compute per-kernel breakdown of a decode step
#                                    (GLM-Z1-9B shapes, 8 layers, int4 and fp16)
#   bash bench/gpu.sh sweep          decode-speed variants on 8 GLM-Z1-9B layers (bench/sweep.py);
#                                    writes /tmp/work/best.sh, which the stages below source
#                                    when BEST=1 (the ORT switches and fp16 layout it found fastest)
#   bash bench/gpu.sh 9b             GLM-Z1-9B shapes, synthetic weights: int4 + fp16 export, bench
#   bash bench/gpu.sh 32b            GLM-4-32B shapes: int4 (61 layers), fp16 (8 and 24 of 61 layers)
#   bash bench/gpu.sh gemv           how fast a plain int4 GEMV reads the MatMulNBits layout
#                                    (cubins from 'python3 bench/gemv_probe.py build', carried in build/gemv)
#   bash bench/gpu.sh hf             HF transformers eager bf16 baseline, same shapes
#   bash bench/gpu.sh engine         glmrt's cuda engine, correctness (bench/cuda_engine_check.py): toolchain
#                                    smoke, every kernel vs numpy at GLM-Z1-9B/GLM-4-32B shapes (and each
#                                    bucket's of an engine for 8 slots; GLM-4-32B: 4) and timed
#                                    alone, the whole engine vs ONNX Runtime's CUDA form and the float64
#                                    reference (small and 4-layer GLM-Z1-9B models, int4 and fp16), the
#                                    decoder conformance tests on it, a launch-parameter sweep; each part
#                                    under its own time limit, all within BUDGET (500 s) + the summary
#   bash bench/gpu.sh engine-bench   glmrt's cuda engine, speed: GLM-Z1-9B int4 (40 layers) built on the GPU
#                                    (build time), glmrt bench --backend cuda and ONNX Runtime's form in the
#                                    same run, device memory with the engine's own or shared weights;
#                                    SETS="glm-z1-9b:fp16 glm-4-32b:int4" for the others (one per call);
#                                    ACTS="int8 default": also the engine built with --activations int8
#   bash bench/gpu.sh engine-tune    launch-configuration candidates, kernels only: the GEMV and attention
#                                    sweeps (SWEEP=0 skips them), then the whole step under each of
#                                    CONFIGS='{"label": {"gemv": {...}, "attention": {...}}, ...}'
#   bash bench/gpu.sh engine-mma     the tensor-core int4 GEMV: rows of x 1..8 against the CUDA-core one, its
#                                    kernel checks, the whole step under CONFIGS (kernels only)
#   bash bench/gpu.sh engine-gemv    the int4 GEMVs' checks and timings, GLM-Z1-9B's int4 step (each kernel emptied),
#                                    GLM-4-32B's and fp8's steps, CONFIGS; NCU=1 Nsight Compute's stall sections
#   bash bench/gpu.sh engine-ring    the GEMVs' weights through a cp.async ring in shared memory: RING_CONFIGS swept in
#                                    GLM-Z1-9B's int4 step, the best checked at real shapes and timed in every step
#   bash bench/gpu.sh engine-roles   launch knobs role by role (and the attention's chunk, splits) in GLM-Z1-9B's and
#                                    GLM-4-32B's int4 steps, over BASE
#   bash bench/gpu.sh engine-steps   kernels only: GLM-Z1-9B's and GLM-4-32B's int4 steps under CONFIGS9 / CONFIGS32 as
#                                    bursts of 8, the candidates in turn twice (KERNELS: a configuration checked first)
#   bash bench/gpu.sh engine-buildtime GLM-Z1-9B int4 exported, then built tuned (cold, warm) and --no-tune: where each
#                                    build's time goes (its manifest's "seconds"); no ONNX Runtime needed
#   bash bench/gpu.sh engine-autotune the build's tuner on zero-filled weights of GLM-Z1-9B's and GLM-4-32B's int4 shapes
#   bash bench/gpu.sh engine-fp8     fp8 weights on the engine, kernels only: checks at real shapes, each kernel
#                                    timed, GLM-Z1-9B's fp8 step; the batched kernels' bucket checks
#   bash bench/gpu.sh engine-attn    kernels only: the attention's merge variants in GLM-Z1-9B's step, GLM-4-32B's
#                                    and bf16's steps, bf16's kernel checks, GLM-4-32B's bucket checks; SPREAD=1:
#                                    the spread merge checked against numpy at real shapes
#   bash bench/gpu.sh engine-slots   continuous batching on the engine: GLM-Z1-9B int4 built with --max-batch 8,
#                                    glmrt bench --slots 1,2,4,8 of it and of ONNX Runtime's form, the batched
#                                    steps against single ones (after `install`)
#   bash bench/gpu.sh engine-ncu     Nsight Compute on the engine's decode steps (8 GLM-Z1-9B int4 layers,
#                                    fp16 x and int8 x), then GLM-4-32B's whole int4 step as a graph;
#                                    NCU_SECTIONS=1 / NCU_SASS=1: the attention alone, ncu's sections / its
#                                    stall samples per SASS instruction (bench/cuda_engine_check.py ncu-stalls)
#   bash bench/gpu.sh genai          onnxruntime-genai-cuda beside glmrt on the same GLM-Z1-9B-shaped
#                                    folder (export --for onnxruntime-genai; bench/genai_bench.py), after
#                                    `install`; onnxruntime_genai_cuda-0.18.0-cp312-*.whl in .whl/ (chunk
#                                    installs it, or this stage when .whl travels with it). `prep` can
#                                    make its exports: EXPORTS="9b-int4+genai 9b-fp16+genai"
# SETS="int4: int4+lmh: fp16:8" picks precisions (+lmh: int4 lm_head too) and layer counts for 9b/32b.
# TAG=name is added to the JSON names (for A/B runs under different ORT_* switches).
# Logs and JSON go to $OUT (the device tool brings them back).
set -uo pipefail
stage=${1:?stage}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/work
export PYTHONPATH=/tmp/site:/tmp/glmrt-site PYTHONUNBUFFERED=1
W=/tmp/work
REPO=$(pwd)
cd "$W"     # not the checkout: its glmrt/ folder would shadow the installed package
run() { echo "+ $*"; "$@"; }

export_bg() {   # name -> /tmp/work/NAME (shape-precision[:layers][+genai]), logged; skipped when present
  for e in $*; do
    flags=""; base=${e%+genai}; [ "$base" != "$e" ] && flags="--for onnxruntime-genai"
    shape=${base%%-*}; rest=${base#*-}; prec=${rest%%:*}; layers=""; [ "$rest" != "$prec" ] && layers=":${rest#*:}"
    case $shape in 9b) src=synthetic:glm-z1-9b$layers;; 32b) src=synthetic:glm-4-32b$layers;; *) src=$shape;; esac
    dir=$W/$e
    [ -f "$dir/manifest.json" ] && continue
    start=$(date +%s)
    python3 -m glmrt.cli export "$src" -o "$dir" --precision "$prec" --target cuda $flags --overwrite >> $W/exports.log 2>&1
    echo "exported $e ($src $prec): $(( $(date +%s) - start )) s" >> $W/exports.log
  done
  echo done >> $W/exports.done
}

fresh_glmrt() {   # this checkout's glmrt, fresh every time (a warm machine's /tmp/glmrt-site may be an
                  # older one, and background exports may be running from it): its own folder, first on the path
  rm -rf /tmp/glmrt-engine-site && python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --target /tmp/glmrt-engine-site "$REPO" && export PYTHONPATH=/tmp/glmrt-engine-site:$PYTHONPATH &&
    echo "glmrt from $REPO installed for this stage"
}

show_tuned() {    # what `glmrt build --backend cuda` tuned and where its time went: its engine manifest's "tuned" and
                  # "seconds" (MODEL PRECISION), to $LOG
  for m in "$1"/engines/*-sm*/"$2"/manifest.json; do
    python3 -c 'import json, sys; m = json.load(open(sys.argv[1]))
print("tuned:", json.dumps(m.get("tuned"))); print("build seconds:", json.dumps(m.get("seconds")))' "$m" | tee -a "$LOG"
  done
}

wait_exports() {
  for i in $(seq 1 120); do [ -f $W/exports.done ] && break; sleep 5; done
  cat $W/exports.log 2>/dev/null | grep -v "export layers" | tail -5
}

case "$stage" in
chunk)    # carry .gpu/partK (and, with the last part, .whl: the small wheels the server needs)
  k=${2:?part}
  mkdir -p /tmp/chunks /tmp/site && cp "$REPO/.gpu/part$k" /tmp/chunks/ && ls -la /tmp/chunks
  # (its exit status is the copy's and the install's: `chunk 4 && install` must not stop on a missing .whl)
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$REPO"/.whl/*.whl &&
      echo "wheels installed: $(ls "$REPO"/.whl | wc -l)" || exit 1
  fi
  if [ "$k" = 0 ]; then (cd "$REPO" && bash bench/gpu.sh prep) || exit 1; fi
  ;;
prep)
  mkdir -p /tmp/site
  rm -rf /tmp/glmrt-site && python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --target /tmp/glmrt-site "$REPO" && echo "glmrt installed"
  python3 -c "import numpy, onnx; print('numpy', numpy.__version__, 'onnx', onnx.__version__)"
  rm -f $W/exports.done $W/exports.log
  export -f export_bg; export W
  setsid nohup bash -c "export_bg ${EXPORTS:-9b-int4 9b-fp16}" > /dev/null 2>&1 < /dev/null &
  echo "exports started in the background: ${EXPORTS:-9b-int4 9b-fp16}"
  ;;
install)
  whl=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  cat /tmp/chunks/part? > /tmp/$whl &&
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/$whl &&
  # glmrt once (prep may have installed it already, and exports may be running from it)
  { [ -d /tmp/glmrt-site/glmrt ] || python3 -m pip install -q --no-index --no-deps --no-build-isolation \
      --target /tmp/glmrt-site "$REPO"; } &&
  python3 -c "import onnxruntime as o, glmrt.export.export; print(o.__version__, o.get_available_providers())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  ;;
tests)
  run python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_cuda_form.py" "$REPO/tests/test_backends.py" \
    "$REPO/tests/test_batching.py" -rs 2>&1 | tee "$OUT/gpu-tests.log"
  ;;
slots)   # continuous batching on the exports `prep` made: glmrt bench --slots
  wait_exports
  for e in ${SLOTS_SETS:-9b-int4}; do
    run python3 -m glmrt.cli bench "$W/$e" --slots 1,2,4,8 --contexts 128 --json "$OUT/slots-$e${TAG:+-$TAG}.json" \
      2>&1 | tee -a "$OUT/slots.log"
  done
  ;;
serve)   # the loopback load test on the GPU (bench/serve_load.py) on an export `prep` made
  wait_exports
  e=${SERVE_SET:-9b-int4}
  run python3 "$REPO/bench/serve_load.py" "$W/$e" --device cuda --slots ${SERVE_SLOTS:-8} --clients 32 \
    --seconds ${SERVE_SECONDS:-30} --max-tokens 64 --check structure --json "$OUT/serve-load-$e.json" \
    2>&1 | tail -30 | tee "$OUT/serve-load.log"
  ;;
ncu)
  for prec in int4 fp16; do
    dir=$W/glm-z1-9b-8L-$prec
    python3 -m glmrt.cli export synthetic:glm-z1-9b:8 -o "$dir" --precision $prec --target cuda --overwrite 2>&1 | tail -1
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    run "$NCU" --profile-from-start off --clock-control none --csv --print-units base \
      --print-kernel-base function --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      --log-file "$OUT/ncu-9b-8L-$prec.csv" python3 "$REPO/bench/kernels.py" run "$dir" --steps 3 2>&1 | tail -3
    python3 "$REPO/bench/kernels.py" report "$OUT/ncu-9b-8L-$prec.csv" --steps 3 --layers 8 \
      --title "GLM-Z1-9B shapes, 8 of 40 layers, $prec, context 128" --json "$OUT/ncu-9b-8L-$prec.json" \
      | tee "$OUT/kernels-9b-8L-$prec.md"
  done
  ;;
sweep)
  run python3 "$REPO/bench/sweep.py" --shape glm-z1-9b --layers 8 --work "$W" --json "$OUT/sweep-9b-8L.json" \
    --best "$W/best.sh" ${ONLY:+--only "$ONLY"} 2>&1 | tee "$OUT/sweep-9b-8L.log"
  ;;
9b|32b)
  [ "${BEST:-0}" = 1 ] && [ -f "$W/best.sh" ] && { cat "$W/best.sh"; . "$W/best.sh"; }
  if [ "$stage" = 9b ]; then shape=glm-z1-9b; sets=${SETS:-"int4: fp16:"}; else shape=glm-4-32b; sets=${SETS:-"int4: fp16:8 fp16:24"}; fi
  for s in $sets; do
    prec=${s%%:*}; layers=${s#*:}; flags=""; name=$prec
    case $prec in *+lmh) prec=${prec%+lmh}; flags="--quantize-lm-head";; esac     # int4+lmh: int4 lm_head too
    src=synthetic:$shape${layers:+:$layers}
    dir=$W/$shape-$prec
    [ "$prec" = fp16 ] && flags=${FP16_FLAGS:-}
    pre=$W/${stage}-$prec${layers:+:$layers}                      # made by `prep` in the background
    [ -z "$flags" ] && [ -f $W/exports.log ] && wait_exports
    if [ -z "$flags" ] && [ -f "$pre/manifest.json" ]; then
      dir=$pre; keep=1
    else
      keep=0; start=$(date +%s)
      python3 -m glmrt.cli export "$src" -o "$dir" --precision "$prec" --target cuda $flags --overwrite 2>&1 | tail -1
      echo "export $src $prec $flags (env: $(env | grep ^ORT_ | tr '\n' ' ')): $(( $(date +%s) - start )) s, $(du -sh "$dir" | cut -f1)" | tee -a "$OUT/bench-$stage.log"
    fi
    run python3 -m glmrt.cli bench "$dir" ${BENCH_FLAGS:-} --json "$OUT/bench-$shape-$name${layers:+-$layers}L${TAG:+-$TAG}.json" \
      2>&1 | tee -a "$OUT/bench-$stage.log"
    [ "$keep" = 0 ] && rm -rf "$dir"
  done
  ;;
diag)
  python3 -m glmrt.cli tiny "$W/ck" >/dev/null
  python3 -c "
from glmrt.export.synthetic import make_checkpoint, TINY
make_checkpoint('$W/qck', {**TINY, 'hidden_size': 128, 'intermediate_size': 384, 'head_dim': 32}, seed=6, scale=1.0)"
  python3 -m glmrt.cli export "$W/qck" -o "$W/q-int4" --precision int4 --target cuda --overwrite | tail -1
  run python3 "$REPO/bench/graph_diag.py" "$W/q-int4" 2>&1 | tee "$OUT/graph-diag.log"
  ;;
gemv)  # bench/gemv_probe.py: a plain int4 GEMV on the MatMulNBits layout (cubins built here: carry build/gemv)
  run python3 "$REPO/bench/gemv_probe.py" run --cubins "$REPO/build/gemv" --json "$OUT/gemv-probe.json" 2>&1 | tee "$OUT/gemv-probe.log"
  ;;
hf)
  run python3 "$REPO/bench/hf_baseline.py" --json "$OUT/hf-baseline.json" 2>&1 | tee "$OUT/hf-baseline.log"
  ;;
engine|engine-bench)   # glmrt's cuda engine; every part under `timeout`, so one hang or crash costs only its part
  C="python3 $REPO/bench/cuda_engine_check.py ${ENGINE_FLAGS:-}"    # ENGINE_FLAGS=--emulate: a dry run without a GPU
  fresh_glmrt
  LOG=$OUT/$stage.log
  T0=$(date +%s); BUDGET=${BUDGET:-500}       # parts end within BUDGET seconds (later ones shrink or skip), then the summary
  part() { local limit=$1 left=$(( BUDGET - $(date +%s) + T0 )); shift
           [ "$left" -lt "$limit" ] && limit=$left
           if [ "$limit" -lt 10 ]; then echo "SKIP  (stage budget spent) $*" | tee -a "$LOG"; return 1; fi
           echo "+ [$(date +%T), limit ${limit}s] $*" | tee -a "$LOG"
           timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}
           echo "  (exit $rc)" | tee -a "$LOG"; return "$rc"; }
  xport() { local src=$1 dir=$2 prec=$3; shift 3; part 200 python3 -m glmrt.cli export "$src" -o "$dir" \
              --precision "$prec" --target cuda --overwrite "$@"; }
  build() { part 120 python3 -m glmrt.cli build "$1" --backend cuda --overwrite "${@:2}"; }
  if [ "$stage" = engine ]; then
    # ENGINE_PARTS=kernels: the parts that need no ONNX Runtime (while its wheel still travels);
    # ENGINE_PARTS=models: the rest
    # ENGINE_PARTS=kernels also times the whole step (where its time goes) and runs the sweep
    if [ "${ENGINE_PARTS:-all}" != models ]; then
      part 60 $C env
      part 60 $C smoke
      part ${KERNELS_LIMIT:-240} $C kernels --time --slots 8
    fi
    if [ "${ENGINE_PARTS:-all}" = kernels ]; then
      part 150 $C step
      part 180 $C sweep
      timeout 30 $C summary 2>&1 | tee -a "$LOG"; exit 0
    fi
    python3 -c "from glmrt.export.synthetic import make_checkpoint, TINY; make_checkpoint('$W/qck', {**TINY, 'hidden_size': 128, 'intermediate_size': 384, 'head_dim': 32}, seed=6, scale=1.0)" >/dev/null
    for s in ${ENGINE_MODELS:-"small:$W/qck:int4" "small:$W/qck:fp16" "9b-4L:synthetic:glm-z1-9b:4:int4" "9b-4L:synthetic:glm-z1-9b:4:fp16"}; do
      tag=${s%%:*}; rest=${s#*:}; prec=${rest##*:}; src=${rest%:*}; dir=$W/engine-$tag-$prec
      flags=""; [ "$prec" = fp16 ] || [ "$prec" = bf16 ] && flags="--float-layout nk"
      ref="--reference float32 --reference-vs-ort"; [ "$tag" = small ] && ref="--reference float64 --reference-vs-ort"
      xport "$src" "$dir" "$prec" $flags && build "$dir" --gpu "NVIDIA H200@sm90" &&
        part 150 $C model "$dir" $ref --tag "$tag-$prec"
    done
    # the decoder conformance suite on the real engine (tests/test_backends.py's cuda recipe)
    part 120 python3 -m pytest -q -p no:cacheprovider -rs "$REPO/tests/test_backends.py" -k "cuda-cuda-fp16"
    part 150 $C step
    part 180 $C sweep
  else
    for s in ${SETS:-glm-z1-9b:int4}; do
      shape=${s%%:*}; prec=${s#*:}; dir=$W/engine-$shape-$prec; keep=0
      flags=""; [ "$prec" = fp16 ] || [ "$prec" = bf16 ] && flags="--float-layout nk"
      # PREC+lmh4: the export's lm_head in int4 (MatMulNBits) too
      lmh=""; [ "${prec%+lmh4}" != "$prec" ] && { prec=${prec%+lmh4}; flags="$flags --lm-head int4"; lmh="-lmh4"; dir=$W/engine-$shape-$prec$lmh; }
      # PREC+lmh8: an 8-bit MatMulNBits lm_head (the engine's W_INT8; the cuda target's default since session 14)
      [ "${prec%+lmh8}" != "$prec" ] && { prec=${prec%+lmh8}; flags="$flags --lm-head int8"; lmh="-lmh8"; dir=$W/engine-$shape-$prec$lmh; }
      # PREC+lmhf: a float (fp16, W^T) lm_head, the cuda target's default before session 14
      [ "${prec%+lmhf}" != "$prec" ] && { prec=${prec%+lmhf}; flags="$flags --lm-head float"; lmh="-lmhf"; dir=$W/engine-$shape-$prec$lmh; }
      [ -f $W/exports.log ] && wait_exports
      short=$(case $shape in glm-z1-9b) echo 9b;; glm-4-32b) echo 32b;; esac)   # prep's name (EXPORTS="32b-int4")
      if [ -n "$short" ] && [ -z "$flags" ] && [ -f $W/$short-$prec/manifest.json ]; then
        dir=$W/$short-$prec; keep=1                             # `prep` made it, same options
      else
        start=$(date +%s)
        xport "synthetic:$shape" "$dir" "$prec" $flags
        echo "export $shape $prec: $(( $(date +%s) - start )) s, $(du -sh "$dir" | cut -f1)" | tee -a "$LOG"
      fi
      bflags="--prompt-lengths 128,2048 --contexts 128,8192 --repeats 3"
      # ACTS="int8 default": the engine built with --activations int8 (int4 x int8 activations) and
      # benched, then with the default (the engine left for the memory parts is the last one built)
      for act in ${ACTS:-default}; do
        aflag=""; [ "$act" != default ] && aflag="--activations $act"
        start=$(date +%s)
        # the GPU here: compiled, every kernel checked at the model's shapes; if a check fails,
        # compiled without it, so that the speed is still measured
        build "$dir" $aflag && echo "glmrt build --backend cuda $aflag (checked on the GPU): $(( $(date +%s) - start )) s" | tee -a "$LOG" ||
          build "$dir" --gpu "NVIDIA H200@sm90" $aflag
        show_tuned "$dir" "$prec"
        part 150 python3 -m glmrt.cli bench "$dir" --backend cuda $bflags --json "$OUT/engine-bench-$shape-$prec$lmh-cuda${aflag:+-$act}.json"
      done
      part 150 python3 -m glmrt.cli bench "$dir" $bflags --json "$OUT/engine-bench-$shape-$prec$lmh-ort.json"
      [ "${MEMORY:-1}" = 1 ] && for w in engine shared; do part 90 $C memory "$dir" --weights $w --max-context 8192 --tag "$shape-$prec$lmh"; done
      [ -n "${ATT_SWEEP:-}" ] && part 120 $C sweep --only attention
      [ "$keep" = 1 ] || rm -rf "$dir"
    done
  fi
  timeout 30 $C summary 2>&1 | tee -a "$LOG"
  ;;
engine-tune)  # launch-configuration candidates for glmrt's engine, kernels only (no ONNX Runtime, no export):
              # the GEMV and attention sweeps, then GLM-Z1-9B's whole int4 step under each of CONFIGS
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  [ "${SWEEP:-1}" = 1 ] && run timeout 200 $C sweep 2>&1 | tee -a "$OUT/engine-tune.log"
  [ -n "${CONFIGS:-}" ] || CONFIGS='{"default": {}}'
  [ "${SWEEP:-1}" = 1 ] || echo "(sweep skipped)"
  run timeout 200 $C step --configs "$CONFIGS" 2>&1 | tee -a "$OUT/engine-tune.log"
  ;;
engine-mma)   # the tensor-core int4 GEMV, kernels only (no ONNX Runtime, no export): GLM-Z1-9B's four GEMVs at
              # M = 1, 2, 4, 8 rows of x against the CUDA-core one (checked, then timed), every int4 kernel
              # checked with it at GLM-Z1-9B/GLM-4-32B shapes and timed, and the whole step under CONFIGS
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  LOG=$OUT/engine-mma.log
  run timeout ${ROWS_LIMIT:-200} $C rows ${VARIANTS:+--variants "$VARIANTS"} 2>&1 | tee -a "$LOG"
  run timeout 150 $C kernels --mma --time 2>&1 | tee -a "$LOG"
  [ -n "${CONFIGS:-}" ] && run timeout 200 $C step --configs "$CONFIGS" 2>&1 | tee -a "$LOG"
  ;;
engine-gemv)  # the GEMV loop of session 10 (constants in constant memory, the two weight stages swapping roles
              # instead of copied), kernels only: every int4 kernel checked at GLM-Z1-9B / GLM-4-32B shapes and
              # timed alone, GLM-Z1-9B's int4 step with each kernel emptied in turn, GLM-4-32B's and fp8's
              # steps, then CONFIGS; NCU=1: Nsight Compute's stall and issue sections on the 9B step's GEMVs
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  LOG=$OUT/engine-gemv.log
  run timeout 150 $C kernels --linear int4 --time --tag int4 2>&1 | tee -a "$LOG"
  run timeout 120 $C step --linear int4 --tag int4 2>&1 | tee -a "$LOG"
  run timeout 100 $C step --shape glm-4-32b --configs '{"default": {}}' --tag 32b 2>&1 | tee -a "$LOG"
  run timeout 100 $C step --linear fp8 --tag fp8 2>&1 | tee -a "$LOG"
  [ -n "${CONFIGS:-}" ] && run timeout ${CONFIGS_LIMIT:-200} $C step --configs "$CONFIGS" --tag configs 2>&1 | tee -a "$LOG"
  if [ "${CHECKS:-0}" = 1 ]; then         # the other formats' kernels and GLM-Z1-9B's batched buckets, checked
    run timeout 120 $C kernels --linear fp8 --tag fp8 2>&1 | tee -a "$LOG"
    run timeout 120 $C kernels --linear bf16 --tag bf16 2>&1 | tee -a "$LOG"
    run timeout 120 $C kernels --linear fp16 --tag fp16 2>&1 | tee -a "$LOG"
    run timeout 120 $C kernels --slots 8 --buckets-of glm-z1-9b --tag buckets 2>&1 | tee -a "$LOG"
  fi
  if [ "${NCU:-0}" = 1 ]; then
    NCUBIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    run timeout 200 "$NCUBIN" --clock-control none --csv --page details --print-units base \
      --kernel-name "regex:^(qkv|o_proj|gate_up|down)$" --launch-skip 40 --launch-count 4 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section LaunchStats --section MemoryWorkloadAnalysis \
      --log-file "$OUT/ncu-gemv-stalls.csv" $C step --linear int4 --configs '{"default": {}}' --tag ncu 2>&1 | tail -3
  fi
  ;;
engine-ring)  # kernels only: the GEMVs' weights through a cp.async ring in shared memory (gemv_nk STAGES) against
              # the register stages: GLM-Z1-9B's int4 step under RING_CONFIGS (and CONFIGS), the best one picked
              # at 128 positions, then under it: every int4 and fp8 kernel checked at GLM-Z1-9B / GLM-4-32B shapes
              # (int4 timed alone), GLM-Z1-9B's step with each kernel emptied, GLM-4-32B's, fp8's and bf16's
              # steps, and the int4 step with an int4 lm_head
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  LOG=$OUT/engine-ring.log
  ring='{"default": {},
    "r4u2": {"gemv": {"stages": 4, "unroll": 2}},
    "r3u2mb3": {"gemv": {"stages": 3, "unroll": 2, "min_blocks": 3}},
    "r4u1mb4": {"gemv": {"stages": 4, "unroll": 1, "min_blocks": 4}},
    "r6u1mb3": {"gemv": {"stages": 6, "unroll": 1, "min_blocks": 3}},
    "r8u1": {"gemv": {"stages": 8, "unroll": 1}},
    "r3u4mb1": {"gemv": {"stages": 3, "unroll": 4, "min_blocks": 1}},
    "r4u2h1": {"gemv": {"stages": 4, "unroll": 2, "hsum": 1}},
    "r4u1mb4h1": {"gemv": {"stages": 4, "unroll": 1, "min_blocks": 4, "hsum": 1}},
    "hsum1": {"gemv": {"hsum": 1}},
    "qkvmb3": {"qkv": {"unroll": 2, "min_blocks": 3}},
    "chunk64": {"attention": {"chunk": 64}},
    "chunk128": {"attention": {"chunk": 128}}}'
  run timeout ${RING_LIMIT:-150} $C step --configs "${RING_CONFIGS:-$ring}" --tag ring 2>&1 | tee -a "$LOG"
  best=$(python3 - "$OUT/engine-step-configs-ring.json" "${RING_CONFIGS:-$ring}" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1])); cands = json.loads(sys.argv[2])
at = {k: min(r["us"] for r in v if r["context"] == 128) for k, v in rows.items() if v}
ring = {k: u for k, u in at.items() if "stages" in json.dumps(cands[k]) and "hsum" not in json.dumps(cands[k])}
pick = min(ring, key=ring.get) if ring else "default"
print(json.dumps(cands[pick]))
print(f"picked {pick}: {at.get(pick)} us against default {at.get('default')}", file=sys.stderr)
PY
)
  echo "best ring configuration (the default hsum): $best" | tee -a "$LOG"
  [ -n "${CONFIGS:-}" ] && run timeout ${CONFIGS_LIMIT:-120} $C step --configs "$CONFIGS" --tag configs 2>&1 | tee -a "$LOG"
  run timeout 150 $C kernels --linear int4 --time --config "$best" --tag int4-ring 2>&1 | tee -a "$LOG"
  run timeout 100 $C step --linear int4 --config "$best" --tag best 2>&1 | tee -a "$LOG"
  run timeout 60 $C step --shape glm-4-32b --configs "{\"default\": {}, \"best\": $best}" --tag 32b 2>&1 | tee -a "$LOG"
  run timeout 60 $C step --linear fp8 --configs "{\"default\": {}, \"best\": $best}" --tag fp8 2>&1 | tee -a "$LOG"
  run timeout 60 $C step --linear bf16 --configs "{\"default\": {}, \"best\": $best}" --tag bf16 2>&1 | tee -a "$LOG"
  lmh=$(python3 -c 'import json, sys; b = json.loads(sys.argv[1]); print(json.dumps({"default": {}, "best": b, "best+lm_head": {**b, "lm_head": b.get("gemv", {})}}))' "$best")
  run timeout 60 $C step --linear int4 --lm-head int4 --configs "$lmh" --tag lmh4 2>&1 | tee -a "$LOG"
  run timeout 120 $C kernels --linear fp8 --config "$best" --tag fp8-ring 2>&1 | tee -a "$LOG"
  ;;
engine-roles) # kernels only: launch knobs role by role in GLM-Z1-9B's and GLM-4-32B's int4 steps (the tiles of a
              # GEMV against its grid: one wave or more), the attention's chunk and splits, over a base
              # configuration BASE (JSON knobs); CONFIGS replaces the candidates
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  LOG=$OUT/engine-roles.log
  cands=$(python3 - "${BASE:-{\}}" <<'PY'
import json, sys
base = json.loads(sys.argv[1])
def over(**o):
    c = json.loads(json.dumps(base))
    for k, v in o.items():
        c[k] = {**c.get(k, {}), **v}
    return c
u2mb3 = {"unroll": 2, "min_blocks": 3}
out = {"default": {}, "base": base,
       "qkv u2mb3": over(qkv=u2mb3), "o_proj u2mb3": over(o_proj=u2mb3), "down u2mb3": over(down=u2mb3),
       "gate_up u2mb3": over(gate_up=u2mb3), "qkv u1mb4": over(qkv={"unroll": 1, "min_blocks": 4}),
       "qkv w16mb1": over(qkv={"warps": 16, "min_blocks": 1}), "down w16mb1": over(down={"warps": 16, "min_blocks": 1}),
       "chunk128": over(attention={"chunk": 128}), "chunk256": over(attention={"chunk": 256}),
       "splits32": over(attention={"splits": 32}), "splits96": over(attention={"splits": 96}),
       "hsum1": over(gemv={"hsum": 1})}
print(json.dumps(out))
PY
)
  run timeout ${ROLES_LIMIT:-150} $C step --configs "${CONFIGS:-$cands}" --tag roles-9b 2>&1 | tee -a "$LOG"
  run timeout ${ROLES_LIMIT:-150} $C step --shape glm-4-32b --configs "${CONFIGS:-$cands}" --tag roles-32b 2>&1 | tee -a "$LOG"
  ;;
engine-steps) # kernels only: whole int4 decode steps under candidate launch configurations, GLM-Z1-9B's (CONFIGS9)
              # and GLM-4-32B's (CONFIGS32), each timed as bursts of 8 steps (what the runtime replays), the
              # candidates in turn twice, medians against the first; KERNELS='{knobs}': first every int4 kernel
              # checked against numpy at both shapes under that configuration
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  LOG=$OUT/engine-steps.log
  [ -n "${KERNELS:-}" ] && run timeout 150 $C kernels --linear int4 --config "$KERNELS" --tag checked 2>&1 | tee -a "$LOG"
  run timeout ${STEPS_LIMIT:-200} $C step --configs "${CONFIGS9:-{\"default\": {\}\}}" --burst 8 --rounds 2 \
    --tag steps-9b 2>&1 | tee -a "$LOG"
  run timeout ${STEPS_LIMIT:-200} $C step --shape glm-4-32b --configs "${CONFIGS32:-{\"default\": {\}\}}" --burst 8 \
    --rounds 2 --tag steps-32b 2>&1 | tee -a "$LOG"
  ;;
engine-buildtime) # no ONNX Runtime needed: GLM-Z1-9B int4 exported here, then `glmrt build --backend cuda` tuned (a cold
              # compile cache, then warm) and --no-tune, each build's manifest "seconds" (upload, tune, compile, check)
  fresh_glmrt
  LOG=$OUT/engine-buildtime.log
  dir=$W/9b-int4
  [ -f $dir/manifest.json ] || { start=$(date +%s); run timeout 200 python3 -m glmrt.cli export synthetic:glm-z1-9b \
    -o "$dir" --precision int4 --target cuda --overwrite 2>&1 | tail -1 | tee -a "$LOG"; echo "export: $(( $(date +%s) - start )) s" | tee -a "$LOG"; }
  for t in --tune --tune --no-tune; do
    start=$(date +%s)
    run timeout 120 python3 -m glmrt.cli build "$dir" --backend cuda --overwrite $t 2>&1 | tail -1 | tee -a "$LOG"
    echo "build $t: $(( $(date +%s) - start )) s" | tee -a "$LOG"
    show_tuned "$dir" int4
  done
  ;;
engine-autotune) # kernels only: the build's tuner on zero-filled weights of GLM-Z1-9B's and GLM-4-32B's int4 shapes
              # (bench/cuda_engine_check.py tune; the build times the model's own weights), each whole step
              # under the defaults and the configuration chosen, GLM-Z1-9B's kernels checked under it
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  LOG=$OUT/engine-autotune.log
  run timeout 200 $C tune --shape glm-z1-9b --check 2>&1 | tee -a "$LOG"
  run timeout 200 $C tune --shape glm-4-32b 2>&1 | tee -a "$LOG"
  ;;
engine-ab)    # after `install`: GLM-Z1-9B int4 (prep's export) built with --no-tune and tuned, alternately, each benched
              # (glmrt bench --backend cuda) right after its build, ROUNDS times (2): the tuning's gain in the real engine
  fresh_glmrt
  LOG=$OUT/engine-ab.log
  dir=$W/9b-int4
  [ -f $W/exports.log ] && wait_exports
  for round in $(seq 1 ${ROUNDS:-2}); do
    for t in --no-tune --tune; do
      start=$(date +%s)
      run timeout 120 python3 -m glmrt.cli build "$dir" --backend cuda --overwrite $t 2>&1 | tail -2 | tee -a "$LOG" ||
        { echo "build $t failed: nothing benched" | tee -a "$LOG"; continue; }
      echo "build $t: $(( $(date +%s) - start )) s" | tee -a "$LOG"
      show_tuned "$dir" int4
      run timeout 120 python3 -m glmrt.cli bench "$dir" --backend cuda --prompt-lengths 128 --contexts 128,8192 \
        --repeats 3 --json "$OUT/engine-ab-$round${t}.json" 2>&1 | grep "decode at" | tee -a "$LOG"
    done
  done
  ;;
engine-fill)  # kernels only: GLM-Z1-9B's int4 step under the defaults and TUNED (JSON knobs) with zero-filled and random
              # weights, alternating; then what the tuner picks with random weights
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  LOG=$OUT/engine-fill.log
  cf="{\"default\": {}, \"tuned\": ${TUNED:-{\}}}"
  for f in random zero random zero; do
    run timeout 100 $C step --fill $f --configs "$cf" --tag fill-$f 2>&1 | grep "step," | sed "s/^/$f /" | tee -a "$LOG"
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader | sed "s/^/after $f: /" | tee -a "$LOG"
  done
  run timeout 150 $C tune --shape glm-z1-9b --fill random --tag random 2>&1 | grep -v "^PASS" | tee -a "$LOG"
  ;;
engine-fp8)   # fp8 weights (e4m3 rows, the cuda target's fp8-rows form), kernels only (no ONNX Runtime, no
              # export): every fp8 kernel checked at GLM-Z1-9B / GLM-4-32B shapes and timed alone, GLM-Z1-9B's
              # whole fp8 step as a graph (zero weights, 40 layers; again with the bit-move decoding sm_80-87
              # run), and the int4 engine's batched kernels bucket by bucket (the build's GPU check);
              # LINEAR=bf16 (FP8_BITS=0 BUCKETS=0): the same for bf16 weights
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  L=${LINEAR:-fp8}
  LOG=$OUT/engine-$L.log
  slots=""; [ "${BUCKETS:-8}" != 0 ] && slots="--slots ${BUCKETS:-8}"
  run timeout 240 $C kernels --linear $L --time $slots 2>&1 | tee -a "$LOG"
  run timeout 150 $C step --linear $L --tag $L 2>&1 | tee -a "$LOG"
  [ "${FP8_BITS:-1}" = 1 ] && [ "$L" = fp8 ] && run timeout 100 $C step --linear fp8 --fp8-bits --tag bits 2>&1 | tee -a "$LOG"
  ;;
engine-attn)  # kernels only (no ONNX Runtime, no export): GLM-Z1-9B's whole int4 step with the attention's splits
              # merged by the last split or apart (attention_merge), GLM-4-32B's step, bf16's step, then (slower:
              # random weights of the real shapes) bf16's kernel checks and GLM-4-32B's bucket checks
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  LOG=$OUT/engine-attn.log
  merges='{"last": {}, "spread64": {"attention": {"merge": "spread"}}, "spread128": {"attention": {"merge": "spread", "splits": 128}}}'
  run timeout 150 $C step --configs "${CONFIGS:-$merges}" 2>&1 | tee -a "$LOG"
  run timeout 100 $C step --shape glm-4-32b --configs '{"default": {}}' --tag 32b 2>&1 | tee -a "$LOG"
  run timeout 100 $C step --linear bf16 --tag bf16 2>&1 | tee -a "$LOG"
  run timeout 120 $C kernels --linear bf16 --time 2>&1 | tee -a "$LOG"
  run timeout ${BUCKET_LIMIT:-100} $C kernels --slots 4 --buckets-of glm-4-32b 2>&1 | tee -a "$LOG"
  # SPREAD=1: the spread merge checked against numpy at GLM-Z1-9B / GLM-4-32B shapes (fp8 layers: the
  # quickest full kernel set) and in GLM-Z1-9B's buckets
  if [ "${SPREAD:-0}" = 1 ]; then
    run timeout 200 $C kernels --linear fp8 --attention '{"merge": "spread"}' 2>&1 | tee -a "$LOG"
    run timeout 100 $C kernels --attention '{"merge": "spread"}' --slots 4 --buckets-of glm-z1-9b 2>&1 | tee -a "$LOG"
  fi
  ;;
engine-slots) # continuous batching on glmrt's engine (after `install`): GLM-Z1-9B int4 (40 layers, `prep`'s export)
              # built with --max-batch 8 (checked on the GPU), glmrt bench --slots 1,2,4,8 of the engine and of
              # ONNX Runtime's form in the same call; then a 4-layer GLM-Z1-9B model's batched steps against
              # single ones (bench/cuda_engine_check.py slots)
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  LOG=$OUT/engine-slots.log
  dir=$W/9b-int4
  [ -f $W/exports.log ] && wait_exports
  [ -f $dir/manifest.json ] || run python3 -m glmrt.cli export synthetic:glm-z1-9b -o "$dir" --precision int4 --target cuda --overwrite
  start=$(date +%s)
  run timeout 200 python3 -m glmrt.cli build "$dir" --backend cuda --max-batch ${MAX_BATCH:-8} --overwrite 2>&1 | tee -a "$LOG"
  echo "glmrt build --backend cuda --max-batch ${MAX_BATCH:-8} (checked on the GPU): $(( $(date +%s) - start )) s" | tee -a "$LOG"
  run timeout 200 python3 -m glmrt.cli bench "$dir" --backend cuda --slots 1,2,4,8 --contexts 128 \
    --json "$OUT/slots-engine-9b-int4${TAG:+-$TAG}.json" 2>&1 | tee -a "$LOG"
  [ "${ORT_SLOTS:-1}" = 1 ] && run timeout 150 python3 -m glmrt.cli bench "$dir" --slots 1,2,4,8 --contexts 128 \
    --json "$OUT/slots-ort-9b-int4${TAG:+-$TAG}.json" 2>&1 | tee -a "$LOG"
  small=$W/engine-9b-4L-int4
  [ -f "$small/manifest.json" ] || python3 -m glmrt.cli export synthetic:glm-z1-9b:4 -o "$small" --precision int4 --target cuda --overwrite >/dev/null
  python3 -m glmrt.cli build "$small" --backend cuda --max-batch 8 --overwrite --gpu "NVIDIA H200@sm90" >/dev/null &&
    [ "${CHECK:-1}" = 1 ] && run timeout 150 $C slots "$small" --max-context 512 --tag 9b-4L 2>&1 | tee -a "$LOG"
  if [ "${NCU:-0}" = 1 ]; then   # Nsight Compute: 3 batched steps of 8 slots of 8 GLM-Z1-9B layers (7 launches a layer + 2)
    NCUBIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    d8=$W/engine-9b-8L-int4
    [ -f "$d8/manifest.json" ] || python3 -m glmrt.cli export synthetic:glm-z1-9b:8 -o "$d8" --precision int4 --target cuda --overwrite >/dev/null
    python3 -m glmrt.cli build "$d8" --backend cuda --max-batch 8 --overwrite --gpu "NVIDIA H200@sm90" >/dev/null
    for n in ${NCU_SLOTS:-8}; do
      run timeout 200 "$NCUBIN" --clock-control none --csv --print-units base --print-kernel-base function \
        --kernel-name "regex:^(row_norm|row_embed|qkv|attention|o_proj|gate_up|down|lm_head)(_b[0-9]+)?$" \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum --log-file "$OUT/ncu-slots$n-9b-8L.csv" \
        $C ncu-run "$d8" --slots $n --steps 3 2>&1 | tail -1
      $C ncu-report "$OUT/ncu-slots$n-9b-8L.csv" --layers 8 --steps 3 --per-step $(( n > 1 ? 7 * 8 + 2 : 5 * 8 + 1 )) \
        --tag "slots$n-9b-8L" 2>&1 | tee -a "$LOG"
    done
  fi
  ;;
engine-ncu)   # Nsight Compute on glmrt's engine: 8 GLM-Z1-9B int4 layers, 3 decode steps at context 128,
              # fp16 x and int8 x; then GLM-4-32B's whole int4 step timed as a graph (61 layers);
              # NCU_CONTEXT=8192: the decode steps at that context (ACTS="fp16": one build only)
  C="python3 $REPO/bench/cuda_engine_check.py"
  fresh_glmrt
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  dir=$W/engine-9b-8L-int4
  python3 -m glmrt.cli export synthetic:glm-z1-9b:8 -o "$dir" --precision int4 --target cuda --overwrite || exit 1
  per=$(( 5 * 8 + 1 ))
  ctx=${NCU_CONTEXT:-128}
  # the attention alone under ncu: the second decode step's launches after the engine's 128-token
  # prefill (8 a step), at context $1, ncu's further options after it
  ncu_attention() { local c=$1; shift
    timeout 150 "$NCU" --clock-control none --kernel-name regex:"^attention$" --launch-skip $(( 128 * 8 + 8 )) "$@" \
      $C ncu-run "$dir" --steps 3 --context $c --max-context $(( ctx + 64 )); }
  for act in ${ACTS:-fp16 int8}; do
    python3 -m glmrt.cli build "$dir" --backend cuda --overwrite --gpu "NVIDIA H200@sm90" --activations $act || exit 1
    run timeout 240 "$NCU" --clock-control none --csv --print-units base --print-kernel-base function \
      --kernel-name "regex:^(qkv_first|qkv|attention|o_proj|gate_up|down|lm_head)$" \
      --launch-skip $(( 124 * per )) --launch-count $(( 8 * per )) \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum --log-file "$OUT/ncu-engine-9b-8L-$act.csv" \
      $C ncu-run "$dir" --steps 3 --context $ctx --max-context $(( ctx + 64 )) 2>&1 | tail -2
    $C ncu-report "$OUT/ncu-engine-9b-8L-$act.csv" --layers 8 --steps 3 --tag "9b-8L-int4-$act-ctx$ctx" 2>&1 | tee -a "$OUT/engine-ncu.log"
    # NCU_SECTIONS=1: the attention alone under ncu's sections (throughput, occupancy, warp stall
    # reasons, memory), two launches of a decode step at context 128 and at $ctx
    if [ -n "${NCU_SECTIONS:-}" ]; then
      for c in $(echo 128 $ctx | tr ' ' '\n' | sort -un); do
        run ncu_attention $c --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats \
          --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
          > "$OUT/ncu-attention-$act-ctx$c.txt" 2>&1
        tail -3 "$OUT/ncu-attention-$act-ctx$c.txt"
      done
    fi
    # NCU_SASS=1: one attention launch at $ctx, every metric (--set full, raw page) and the warps'
    # stall samples per SASS instruction (source page)
    if [ -n "${NCU_SASS:-}" ]; then
      run ncu_attention $ctx --launch-count 1 --set full --import-source no --page raw \
        > "$OUT/ncu-attention-$act-ctx$ctx-raw.txt" 2>&1
      run ncu_attention $ctx --launch-count 1 --section SourceCounters --section WarpStateStats --page source \
        --print-source sass --csv > "$OUT/ncu-attention-$act-ctx$ctx-sass.csv" 2>&1
      $C ncu-stalls "$OUT/ncu-attention-$act-ctx$ctx-sass.csv" --tag "attention-$act-ctx$ctx" 2>&1 | tee -a "$OUT/engine-ncu.log"
    fi
  done
  if [ -z "${NCU_SECTIONS:-}${NCU_SASS:-}" ]; then     # (an `if`: the stage's status is not this test's)
    run timeout 200 $C step --shape glm-4-32b --act int8 2>&1 | tee -a "$OUT/engine-ncu.log"
  fi
  ;;
genai)  # SETS="int4 fp16" (precisions), CONTEXTS=128,2048; all 40 layers
  whl=$(ls "$REPO"/.whl/onnxruntime_genai_cuda-*-cp312-*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] && { python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$whl" || exit 2; }
  [ -d /tmp/site/onnxruntime_genai ] || { echo "onnxruntime-genai-cuda is not installed: carry .whl holding its cp312 wheel"; exit 2; }
  # its CUDA library links cuBLAS/cudart 13, cuFFT and cuRAND: the image's nvidia-* wheels and toolkit
  libdirs=$( { find $(python3 -c 'import site, sys; print(" ".join(p for p in site.getsitepackages() + sys.path if p))') \
      /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib -maxdepth 4 \
      \( -name 'libcufft.so.*' -o -name 'libcurand.so.*' -o -name 'libcublas.so.*' -o -name 'libcublasLt.so.*' \
         -o -name 'libcudart.so.*' \) -printf '%h\n' 2>/dev/null; } | sort -u | paste -sd: )
  export LD_LIBRARY_PATH=${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$OUT/genai.log"
  ldd /tmp/site/onnxruntime_genai/libonnxruntime-genai-cuda.so | grep -E "not found|cublas|cufft|curand|cudart" | tee -a "$OUT/genai.log"
  python3 -c "import onnxruntime as o, onnxruntime_genai as g; print('onnxruntime', o.__version__, 'genai', g.__version__, 'cuda', g.is_cuda_available())" 2>&1 | tee -a "$OUT/genai.log"
  for prec in ${SETS:-int4 fp16}; do
    dir=$W/9b-$prec+genai; keep=1                                  # made by `prep` in the background
    [ -f $W/exports.log ] && wait_exports
    if [ ! -f "$dir/manifest.json" ]; then
      keep=0; start=$(date +%s)
      python3 -m glmrt.cli export synthetic:glm-z1-9b -o "$dir" --precision "$prec" --target cuda \
        --for onnxruntime-genai --overwrite 2>&1 | tail -1 | tee -a "$OUT/genai.log"
      echo "export $prec: $(( $(date +%s) - start )) s" | tee -a "$OUT/genai.log"
    fi
    echo "$dir: $(du -sh "$dir" | cut -f1); graphs $(ls -la "$dir"/*.onnx | awk '{print $5, $9}' | tr '\n' ' ')" | tee -a "$OUT/genai.log"
    run python3 "$REPO/bench/genai_bench.py" "$dir" --contexts "${CONTEXTS:-128,2048}" \
      --json "$OUT/genai-9b-$prec${TAG:+-$TAG}.json" 2>&1 | tee -a "$OUT/genai.log"
    [ "$keep" = 0 ] && rm -rf "$dir"
  done
  ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
