"""Evaluation: the digits data of the embedded default (``digits``), the digits classifier that is its feature
network (``classifier``), the sample-set format (``sample_sets``), FID references (``reference``) and the
torch-fidelity metrics (``metrics``)."""
