"""The engine: data, corruptions, training and evaluation, cost measurement, model summaries and deployment
(everything that works on a model and a dataset, knowing nothing of runs, profiles or notebooks)."""
