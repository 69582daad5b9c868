"""Evaluation of trained models: chunked cross-modal retrieval, zero-shot classification and a linear probe.

``codebridge.eval.run.evaluate`` is what ``codebridge eval`` calls; ``evaluate_model`` is the trainer's periodic
evaluation. The metric functions in ``retrieval``, ``zeroshot`` and ``linear_probe`` work on plain tensors.
"""
