"""Model definitions, one file per family: LlamaGen (``llamagen.py``) and VAR (``var.py``)."""
