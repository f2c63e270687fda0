"""Golden checks: our models against reference tensors recorded from the original VAR, LlamaGen and DD code."""
