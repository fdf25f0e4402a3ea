"""Evaluation: metrics, pair and run evaluation, classical references, results files, the paper's figures and the
study.
"""
