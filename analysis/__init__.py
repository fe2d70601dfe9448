"""What a finished search means: one script per question, each on an experiment folder.

* ``python -m analysis.tables EXP``: the paper's ablation tables (Tables 1 to 5) and a table of
  every configuration, in Markdown, LaTeX and CSV (:mod:`analysis.tables`).
* ``python -m analysis.importance EXP``: fANOVA parameter importances at a rung every trial
  reached, score-against-value plots with boundary warnings, learning curves with ASHA's rungs
  (:mod:`analysis.importance`).
* ``python -m analysis.ensemble EXP --top-k K``: the averaged top-K trials on dev (Table 6) and
  their dev and test predictions in the CS224N submission format (:mod:`analysis.ensemble`).
* ``python -m analysis.retrain EXP --top-k K``: a design space that re-runs the K best
  configurations once each at a new budget (``--set``), the ensemble's members trained in full
  (:mod:`analysis.retrain`).
* ``python -m analysis.report EXP``: one Markdown page with all of it, the SST label distribution
  (Figure 4), confusion matrices, the STS scatter and the commands to reproduce
  (:mod:`analysis.report`).

Everything is written into ``EXP/analysis/`` unless ``--out`` says otherwise; bad input is one
line on stderr and exit status 2. Loading the experiment folder is :mod:`analysis.common`.
"""
