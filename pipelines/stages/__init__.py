"""The job's stages, one module each: tokenize, fit-factors, build-queries, score, merge (+ token scores)."""
