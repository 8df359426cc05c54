"""Lightning callbacks: evaluation (sample grids, perplexity, FID, GenEval-style score, captioning accuracy)."""
