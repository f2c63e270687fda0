#!/bin/bash
# usage: pipeline_sweep.sh DEVICE VARIANTS_FILE OUTDIR   (variants: name|family|cfg|distill args)
# One experiment per variant at its CFG: 4 pair shards, distillation, the teacher / onestep* / DD 1-step / DD 2-step /
# dd-teacher-1 sets, FID. COUNT (pairs per shard, 1500) and NUM (samples per set, 2000) shrink a smoke run.
# Inputs under $SWEEP_DIR (default .sweep, git-ignored): ck/ holds the release files of releases/tiny/
# (tiny_{llamagen,var}_{tokenizer,ar}.safetensors, digits_classifier_16.safetensors), reference_16.npz is
# `python -m dd digits-reference --size 16 --out ...`.
# Variants run side by side (one GPU is enough: each process is small); one JSON line per variant in
# OUTDIR/summary.jsonl. README "How long the default takes depends on the CPU" reports what these gave.
DEV=$1; VF=$2; O=$3; mkdir -p $O
S=${SWEEP_DIR:-.sweep}
run_variant() {
  name=$1; fam=$2; cfg=$3; shift 3; dargs="$*"
  d=$O/$name; mkdir -p $d/pairs
  T="--family $fam --tokenizer $S/ck/tiny_${fam}_tokenizer.safetensors --model $S/ck/tiny_${fam}_ar.safetensors --device $DEV --threads 1"
  if [ $fam = var ]; then ts=4; else ts=21; fi
  t0=$(date +%s)
  for sh in 0 1 2 3; do
    python -m dd generate-pairs $T --shard $sh --count ${COUNT:-1500} --seed 0 --chunk 250 --nfe 10 --order 3 --cfg $cfg --temperature 1.0 \
      --out $d/pairs/shard_0000$sh.bin --no-progress > $d/pairs$sh.log 2>&1 &
  done; wait
  python -m dd index-shards --out $d/pairs/index.json $d/pairs/shard_0000{0,1,2,3}.bin > $d/index.log 2>&1 || { echo "$name index failed"; tail -n 5 $d/pairs0.log $d/index.log; return; }
  t1=$(date +%s)
  python -m dd distill $T --pairs $d/pairs/index.json --out $d/distill --num-shards 4 --timesteps 1 $ts --fixed-lr --ema-decay 0.995 \
     --emb-loss mse --ce-weight 0.1 --emb-weight 1.0 --checkpoint-every 100000 --seed 0 --ema-warmup --no-progress $dargs > $d/distill.log 2>&1 || { echo "$name distill failed"; tail -n 5 $d/distill.log; return; }
  t2=$(date +%s)
  run_set() {  # set-name sample-args
    python -m dd sample $T --num ${NUM:-2000} --batch-size 250 --seed 1 --cfg $cfg "${@:2}" --out $d/$1.npz > $d/s-$1.log 2>&1 || { echo "$name $1 sample failed"; tail -n 5 $d/s-$1.log; return; }
    python -m dd evaluate --samples $d/$1.npz --reference $S/reference_16.npz --weights $S/ck/digits_classifier_16.safetensors \
       --feature-extractor digits-classifier --device $DEV --splits 4 --batch-size 250 --isc-splits 10 --kid-subsets 100 \
       --out $d/m-$1.json > $d/e-$1.log 2>&1 || { echo "$name $1 eval failed"; tail -n 5 $d/e-$1.log; }
  }
  run_set teacher --method teacher &
  run_set onestep --method onestep --pairs $d/pairs/index.json &
  run_set dd1 --method dd --steps 1 --split-step $ts --student $d/distill/student.pt &
  run_set dd2 --method dd --steps 1 $ts --split-step $ts --student $d/distill/student.pt &
  run_set ddt1 --method dd-teacher --start 1 --second $ts --split-step $ts --student $d/distill/student.pt &
  wait
  python - "$name" "$d" "$((t1-t0))" "$((t2-t1))" <<'PY'
import json, sys, os
n, d, tp, td = sys.argv[1:]
out = {"name": n, "pairs_s": int(tp), "distill_s": int(td)}
for s in ("teacher", "onestep", "dd1", "dd2", "ddt1"):
    f = f"{d}/m-{s}.json"
    if os.path.exists(f):
        m = json.load(open(f))
        out[s] = [round(m["fid"], 2), round(m["fid_std"], 2), round(m.get("recall", 0), 3), round(m.get("teacher_nll_bits") or 0, 2)]
print(json.dumps(out), flush=True)
PY
}
while IFS='|' read -r name fam cfg args; do
  [ -z "$name" ] && continue
  run_variant $name $fam $cfg $args >> $O/summary.jsonl 2>&1 &
done < $VF
wait
cat $O/summary.jsonl
