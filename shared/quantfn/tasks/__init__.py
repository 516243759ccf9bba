"""Tasks: tokenize -> run -> post-process, one module per task."""
