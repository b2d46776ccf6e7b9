"""lm-eval zero-shot evaluation, quantized variants and the comparison report for spon models."""
