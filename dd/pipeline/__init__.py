"""The Snakemake pipeline's Python side: config validation and defaults (``config``), the experiment plan
(``plan``), the tiny teachers of the embedded default (``tiny_teachers``), released downloads (``download``),
MLflow tracking (``track``, ``mlflow_store``), tables and figures (``report``) and Snakemake helpers
(``snakemake_locks``)."""
