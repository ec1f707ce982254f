"""Evaluation beyond perplexity: lm-evaluation-harness over flash-depth checkpoints."""
