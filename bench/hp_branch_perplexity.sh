#!/usr/bin/env bash
# SmolLM2 perplexity of the fp16 branch at ~2.25 bits vs plain W2 g64 and W2 per-channel (BENCHMARKS.md §6).
# Layer-wise `quantize` from one set of float-model stats, as first measured (`run --hp-channels`, the
# full procedure with the branch, came later: BENCHMARKS.md §6); eval as bench_pipeline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-/tmp/hp_ppl}; DQ=.venv/bin/decoupleq
EV=../shared/data/wikitext-2-raw/wiki.test.raw
$DQ calibrate --text ../shared/data/wikitext-2/valid.txt --nsamples 16 --seqlen 512 --seed 0 --out $D/stats
for spec in "w2g64:--group-size 64" "w2pc_hp8:--group-size -1 --hp-channels 8" "w2pc:--group-size -1"; do
  name=${spec%%:*}; opts=${spec#*:}
  /usr/bin/time -f "$name quantize %e s" $DQ quantize --stats $D/stats --bits 2 $opts --out $D/$name
  $DQ eval --quantized $D/$name --text $EV --seqlen 512 --max-tokens 8192 --json > $D/$name.json
  cat $D/$name.json
done
