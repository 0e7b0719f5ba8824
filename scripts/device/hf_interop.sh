#!/usr/bin/env bash
# On the GPU machine (it has torch, transformers and peft): reference fixtures from
# transformers + PEFT, then the PEFT/transformers interop check of what ferrotune writes.
# Needs a prebuilt ferrotune binary at target/gpu-bundle/ferrotune. Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
FT=$PWD/target/gpu-bundle/ferrotune
export PYTHONUNBUFFERED=1
python3 scripts/fixtures/hf_reference.py "$OUT/hf" || exit 1

# Train a few LoRA steps with ferrotune on the tiny Llama fixture, merge, score.
W=/tmp/interop; rm -rf $W; mkdir -p $W
cp -r "$OUT/hf/llama/model" $W/base
cp tests/fixtures/tokenizers/mistral7b/* $W/base/
$FT data arithmetic --digits 2 --train 64 --eval 8 --seed 3 --out $W/data > /dev/null
cat > $W/config.yaml <<YAML
base_model: $W/base
datasets:
  - path: $W/data/train.jsonl
    type: chat_template
    chat_template: chatml
sequence_len: 64
micro_batch_size: 4
max_steps: 5
learning_rate: 0.01
adapter: lora
lora_r: 4
lora_alpha: 8
lora_target_linear: true
output_dir: $W/adapter
device: cpu
YAML
$FT train $W/config.yaml 2>&1 | tail -2
$FT merge $W/config.yaml --adapter $W/adapter --out $W/merged 2>&1 | tail -1
IDS=1,415,2936,9060,285,1210,754,272,17898,3914,28723,13,5,77,901,31999
echo $IDS > $W/ids.txt
$FT score --model $W/base --adapter $W/adapter --ids $IDS --logits-out $W/ours.safetensors --device cpu | head -2
python3 scripts/interop/peft_check.py $W "$OUT/interop.json"
echo "interop exit: $?"
rm -rf "$OUT/hf"
ls -la "$OUT"
