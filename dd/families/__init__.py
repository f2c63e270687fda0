"""Teacher families: one sub-package per family (its tokenizer, AR transformer, DD student, ``Teacher`` adapter,
released-checkpoint loaders and golden checks) and one ``Family`` adapter each (``base``), listed in ``registry``.
``loading`` builds and loads teachers and students through the adapters."""
