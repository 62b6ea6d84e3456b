"""Evaluation: held-out sampling and scoring, the end-of-run summary, reports, statistics,
plots and the model card."""
