#!/bin/bash
# usage: student_sweep.sh DEVICE VARIANTS_FILE OUTDIR   (variant file: name|distill args)
# Tiny LlamaGen students on one pair set with the default's other settings: distillation, DD 1-/2-step samples, FID.
# Inputs under $SWEEP_DIR (default .sweep, git-ignored): ck/ holds the release files of releases/tiny/
# (tiny_{llamagen,var}_{tokenizer,ar}.safetensors, digits_classifier_16.safetensors), reference_16.npz is
# `python -m dd digits-reference --size 16 --out ...`.
# Variants run side by side (one GPU is enough: each process is small); one JSON line per variant in
# OUTDIR/summary.jsonl. README "How long the default takes depends on the CPU" reports what these gave.
# pairs/ holds the default's tiny LlamaGen pair set (results/tiny_llamagen/pairs/ of a default run).
DEV=$1; VF=$2; O=$3; NUM=${NUM:-2000}; mkdir -p $O
S=${SWEEP_DIR:-.sweep}
T="--family llamagen --tokenizer $S/ck/tiny_llamagen_tokenizer.safetensors --model $S/ck/tiny_llamagen_ar.safetensors --device $DEV --threads 1"
run_variant() {
  name=$1; shift; args="$*"
  d=$O/$name; mkdir -p $d
  ts=$(echo "$args" | grep -o -- "--timesteps [0-9 ]*" | awk '{print $3}')
  [ -z "$ts" ] && ts=21 && args="--timesteps 1 21 $args"
  t0=$(date +%s)
  [ -f $d/student.pt ] || python -m dd distill $T --pairs $S/pairs/index.json --out $d --num-shards 4 --lr-schedule cosine --fixed-lr \
     --ema-warmup --checkpoint-every 100000 --no-progress --emb-loss mse --ce-weight 0.1 --emb-weight 1.0 --ema-decay 0.995 --seed 0 $args > $d/distill.log 2>&1 || { echo "$name distill failed"; tail -5 $d/distill.log; return; }
  t1=$(date +%s)
  for st in 1 2; do
    [ -f $d/m$st.json ] && continue
    steps="1"; [ $st = 2 ] && steps="1 $ts"
    python -m dd sample $T --method dd --num $NUM --batch-size 250 --seed 1 --cfg 2.0 --steps $steps --split-step $ts \
       --student $d/student.pt --out $d/dd$st.npz > $d/s$st.log 2>&1 || { echo "$name sample failed"; tail -5 $d/s$st.log; return; }
    python -m dd evaluate --samples $d/dd$st.npz --reference $S/reference_16.npz --weights $S/ck/digits_classifier_16.safetensors \
       --feature-extractor digits-classifier --device cpu --splits 4 --batch-size 250 --isc-splits 10 --kid-subsets 100 \
       --out $d/m$st.json > $d/e$st.log 2>&1 || { echo "$name eval failed"; tail -5 $d/e$st.log; return; }
  done
  python - "$name" "$d" "$((t1-t0))" <<'PY'
import json, sys
n, d, t = sys.argv[1:]
m = [json.load(open(f"{d}/m{s}.json")) for s in (1, 2)]
def g(x, k): return x.get(k), x.get(k + "_std")
print(json.dumps({"name": n, "distill_s": int(t), **{f"dd{s}_{k}": g(m[s-1], k) for s in (1, 2) for k in ("fid", "recall", "precision", "teacher_nll_bits")}}), flush=True)
PY
}
while IFS='|' read -r name args; do
  [ -z "$name" ] && continue
  run_variant $name $args >> ${SUMMARY:-$O/summary.jsonl} 2>&1 &
done < $VF
wait
cat ${SUMMARY:-$O/summary.jsonl}
