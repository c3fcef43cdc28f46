"""Coverage-guided fuzzing of dot-proxy's query path (atheris); see ``fuzz/harness.py``."""
