#!/usr/bin/env bash
# The reference results under results/: quick.yaml as shipped and its ensemble, the paper's
# ablation grids (Tables 1-5) with MiniLM on CPU at a small budget, and the search on all the
# local data (full_cpu.yaml) with the final ensemble, then the analysis of each experiment.
# Resumable: run it again and each search continues (--resume) instead of starting over.
# Usage: [EXAMPLES=N EPOCHS=N LR=X GRIDS="..." PARTS="..."] results/run_reference.sh [STORAGE]
#   STORAGE defaults to ../mtl-reference-runs, outside the repo: the experiments hold model
#   checkpoints; only tables, plots, reports and predictions are kept here. EXAMPLES (training
#   examples per task, default 2000), EPOCHS (default 2), LR (one fixed learning rate for every
#   grid; default: see grid_lr below) and GRIDS (default: all four) set the grids' budget;
#   results/BUDGET.md records what each committed table ran with. A grid folder made with other
#   settings resumes only with the same ones (--resume refuses a changed design space): grids made
#   before 2,000 became the default need EXAMPLES=1000 (and the LR they ran with). PARTS (default
#   "quick grids") picks what runs: quick (quick.yaml and its ensemble), grids, and/or
#   full (search_spaces/full_cpu.yaml on all the local data, hours on 2 cores, then its greedy
#   ensemble; its own budget is in the file, not the grids' --set overrides).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
storage=$(realpath -m "${1:-../mtl-reference-runs}")
mkdir -p "$storage"
# The budget, recorded beside the results (results/BUDGET.md says the same in words).
budget=(
  --set "experiment.storage_path=$storage"
  --set base.model.backbone=minilm
  --set "base.data.max_train_examples=${EXAMPLES:-2000}"
  --set base.data.max_eval_examples=1000
  --set base.data.max_length=64
  --set "base.train.epochs=${EPOCHS:-2}"
  --set base.train.eval_every=1
  --set base.train.batch_size=16
  --set base.train.device=cpu
  --set base.train.num_threads=1
  --set base.contrastive.max_val_examples=1000
  --set base.contrastive.epochs=2
  --set resources_per_trial.cpu=1
  --set resources_per_trial.gpu=0
  --set search.max_concurrent_trials=2
)
# A grid's learning rate: Tables 1-2 at the trainer's per-mode default, the paper's (1e-3
# pretrain, 1e-5 finetune: their question is pretrain against finetune as the paper ran them);
# Tables 3-5, all finetune, at 1e-4, since at 1e-5 the heads barely train in this budget and no
# extension could show an effect (README, Results). LR, when set, is every grid's.
grid_lr() {  # grid_lr GRID: the --set for its learning rate, or nothing for the default
  local lr
  case $1 in tables_1_2_*) lr=${LR:-} ;; *) lr=${LR:-1e-4} ;; esac
  if [ -n "$lr" ]; then echo "base.train.lr=$lr"; fi
}

search() {  # search FILE NAME [extra --set ...]
  local file=$1 name=$2; shift 2
  local args=("$file" --num-cpus 2 --no-dashboard --set "experiment.name=$name" "$@")
  # An interrupted search also writes results.csv (its unfinished trials marked), so only the
  # search's own exit status says it finished: 0, recorded here as a marker file; 1 (interrupted)
  # stops this script (set -e) and the next run resumes. A finished search without the marker
  # (made before it existed) resumes to nothing and gets it.
  if [ ! -f "$storage/$name/reference-complete" ]; then
    if [ -d "$storage/$name" ]; then
      python -m mtl.search "${args[@]}" --resume
    else
      python -m mtl.search "${args[@]}"
    fi
    touch "$storage/$name/reference-complete"
  fi
  analysed "$name" || python -m analysis.tables "$storage/$name" --out "results/$name"
}

# Whether results/NAME holds the analysis of the finished search: its report.md was written after
# the search completed. A rerun after an interruption then does not redo the bootstrap tables of
# every grid that had finished (minutes each); remove results/NAME to have them made again.
analysed() {  # analysed NAME
  [ "results/$1/report.md" -nt "$storage/$1/reference-complete" ]
}

analyse_search() {  # analyse_search NAME ENSEMBLE_ARGS...: importance, ensemble, report, once
  local name=$1; shift
  analysed "$name" && return 0
  python -m analysis.importance "$storage/$name" --out "results/$name"
  python -m analysis.ensemble "$storage/$name" "$@" --out "results/$name"
  python -m analysis.report "$storage/$name" --out "results/$name"
}

run_grids() {  # run_grids GRID...: each grid's search at the budget above and its learning rate
  local grid lr
  for grid in "$@"; do
    lr=$(grid_lr "$grid")
    search "search_spaces/ablations/$grid.yaml" "$grid" "${budget[@]}" ${lr:+--set "$lr"}
  done
}

# Sourced (tests/test_run_reference.py): the settings and functions above, nothing run.
(return 0 2>/dev/null) && return 0

grids=${GRIDS:-tables_1_2_design_mode_routine table_3_design_smart table_4_design_routine_pal \
table_5_design_routine_contrastive}
parts=${PARTS:-quick grids}
if [[ " $parts " == *" quick "* ]]; then
  search search_spaces/quick.yaml quick --set "experiment.storage_path=$storage"
fi
if [[ " $parts " == *" grids "* ]]; then
  # shellcheck disable=SC2086  # $grids: a list of names
  run_grids $grids
fi
if [[ " $parts " == *" full "* ]]; then
  search search_spaces/full_cpu.yaml full-cpu --set "experiment.storage_path=$storage"
  # The top 3 completed trials (fewer if ASHA let fewer finish) and their seed repeats.
  k=$(python -c "import pandas as p, sys; r = p.read_csv(sys.argv[1]); \
print(min(3, int((r.status == 'completed').sum())))" "$storage/full-cpu/results.csv")
  analyse_search full-cpu --top-k "$k" --with-repeats --greedy
fi
if [[ " $parts " == *" quick "* ]]; then
  analyse_search quick --top-k 3
fi
if [[ " $parts " == *" grids "* ]]; then
  for grid in $grids; do
    analysed "$grid" || python -m analysis.report "$storage/$grid" --out "results/$grid"
  done
fi
