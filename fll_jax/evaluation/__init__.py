"""Evaluation: the paper's statistics, ROC/AUC, reader study, subgroups and the run's report.

Pure numpy/scipy/scikit-learn/statsmodels/pandas/matplotlib (no JAX, no TensorFlow).
"""
