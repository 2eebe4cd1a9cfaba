#!/usr/bin/env bash
# The model-level measurements of the benchmark issue, split so that each fits one 600 s device call
# (a first compile of a FLUX.1-dev variant takes 100-190 s). bf16 eager anchors every call.
#   bash bench/device_model_sweep.sh all       # every variant of the benchmark issue at 1024^2 in one process, w4a4 and
#                                              # bf16-compile profiled; cold first compiles of 100-194 s each do not
#                                              # all fit one call (it ended during mix: model_flux_dev_all_cold.md)
#   bash bench/device_model_sweep.sh allregional # every variant at 1024^2 in one process: each compiled per block
#                                              # class (compiles of 11-48 s, where full ones take 100-194 s),
#                                              # mix (whose plan differs between blocks) and then w4a4 and
#                                              # bf16-compile fully compiled
#   bash bench/device_model_sweep.sh row1024   # bf16, bf16-compile, mix, w4a4 (profiled) at 1024^2: the target row
#   bash bench/device_model_sweep.sh mix       # bf16, mix, bf16-compile at 1024^2
#   bash bench/device_model_sweep.sh regional  # bf16, regional compiles (bf16 and w4a4), w4a4: first-call time
#   bash bench/device_model_sweep.sh w8a8      # bf16, w8a8, fp8-scaled-mm at 1024^2
#   bash bench/device_model_sweep.sh fp8row    # bf16, w4a4, fp8-scaled-mm at 1024^2: the fp8 target, one process
#   bash bench/device_model_sweep.sh res512    # bf16, w4a4, bf16-compile at 512^2
#   bash bench/device_model_sweep.sh res2048   # bf16, w4a4, bf16-compile at 2048^2
#   bash bench/device_model_sweep.sh batch4    # bf16, w4a4, bf16-compile at 1024^2, batch 4
#   bash bench/device_model_sweep.sh torchao   # bf16, torchao fp8 row-wise (its first call did not finish in ~420 s, twice)
#   bash bench/device_model_sweep.sh template  # bf16, w4a4 with gemm="template", kernel-time breakdown (--profile)
#   bash bench/device_model_sweep.sh producers # bf16, w4a4 (profiled), w4a4 with the GELU (+ cat) inside
#                                              # rotate+quantize, w4a4 with the one-program-per-tile GEMM
#   bash bench/device_model_sweep.sh ws        # bf16, w4a4 (profiled), bf16-compile, w4a4 without warp specialization
#   bash bench/device_model_sweep.sh breakdown # bf16, bf16-compile, w4a4 at 1024^2, both compiled forwards profiled
#   bash bench/device_model_sweep.sh graphs    # bf16, w4a4, bf16-compile with Inductor's CUDA graphs, bf16-compile
#   bash bench/device_model_sweep.sh fp8attn2048 # bf16, w4a4 with fp8 attention, bf16-compile, w4a4 at 2048^2
#   bash bench/device_model_sweep.sh fp8attn1024 # bf16, w4a4 with fp8 attention (profiled), w4a4, bf16-compile at 1024^2
#   bash bench/device_model_sweep.sh fp8attn512 # bf16, w4a4 with fp8 attention, w4a4, bf16-compile at 512^2
#   bash bench/device_model_sweep.sh fp8attnb4  # w4a4 with fp8 attention, w4a4, bf16-compile at 1024^2, batch 4 (no bf16 eager: the three compiles fill the call)
#   bash bench/device_model_sweep.sh gelu      # bf16, w4a4 with the GELU inside rotate+quantize (profiled), w4a4
case "${1:-}" in
  all)     args=(--resolution 1024 --variants bf16,w4a4,bf16-compile,fp8-scaled-mm,mix,w8a8 --profile) ;;
  allregional) args=(--resolution 1024 --variants bf16,w4a4,bf16-compile-regional,fp8-scaled-mm-regional,w8a8,mix,w4a4,bf16-compile) ;;
  row1024) args=(--resolution 1024 --variants bf16,bf16-compile,mix,w4a4 --profile) ;;
  regional) args=(--resolution 1024 --variants bf16,bf16-compile-regional,w4a4,w4a4) ;;
  mix)     args=(--resolution 1024 --variants bf16,mix,bf16-compile) ;;
  w8a8)    args=(--resolution 1024 --variants bf16,w8a8,fp8-scaled-mm) ;;
  fp8row)  args=(--resolution 1024 --variants bf16,w4a4,fp8-scaled-mm --profile) ;;
  res512)  args=(--resolution 512 --variants bf16,w4a4,bf16-compile) ;;
  fp8attn2048) args=(--resolution 2048 --variants bf16,w4a4-fp8attn,bf16-compile,w4a4) ;;
  fp8attn1024) args=(--resolution 1024 --variants bf16,w4a4-fp8attn,w4a4,bf16-compile --profile) ;;
  fp8attn512) args=(--resolution 512 --variants bf16,w4a4-fp8attn,w4a4,bf16-compile) ;;
  fp8attnb4) args=(--resolution 1024 --batch 4 --variants w4a4-fp8attn,w4a4,bf16-compile) ;;
  res2048) args=(--resolution 2048 --variants bf16,w4a4,bf16-compile) ;;
  batch4)  args=(--resolution 1024 --batch 4 --variants bf16,w4a4,bf16-compile) ;;
  torchao) args=(--resolution 1024 --variants bf16,fp8) ;;
  template) args=(--resolution 1024 --variants bf16,w4a4-template --profile) ;;
  producers) args=(--resolution 1024 --variants bf16,w4a4,w4a4-producers,w4a4-flat --profile) ;;
  gelu)    args=(--resolution 1024 --variants bf16,w4a4-producers,w4a4 --profile) ;;
  graphs)  args=(--resolution 1024 --variants bf16,w4a4,bf16-compile-cg,bf16-compile --profile) ;;
  breakdown) args=(--resolution 1024 --variants bf16,bf16-compile,w4a4 --profile) ;;
  ws)      args=(--resolution 1024 --variants bf16,w4a4,bf16-compile,w4a4-nows --profile) ;;
  *) echo "usage: $0 all|allregional|row1024|regional|mix|w8a8|fp8row|res512|res2048|fp8attn512|fp8attn1024|fp8attn2048|fp8attnb4|batch4|torchao|template|producers|ws|breakdown|graphs|gelu" >&2; exit 2 ;;
esac
source bench/device_setup.sh
timeout "${SWEEP_TIMEOUT:-585}" python3 bench/model.py --config flux-dev "${args[@]}" --name "model_flux_dev_$1" --out "$OUT" 2>&1 \
  | grep --line-buffered -v "it/s\]" | tee "$OUT/model_$1.log" | tail -30
