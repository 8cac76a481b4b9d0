"""Measuring a model: the evaluation harness, lm-eval tasks, vLLM serving, the reference's self-checks, and the
`evaluate` kind (a checkpoint made elsewhere).
"""
