"""ml_collections configs: paper.py (the paper's setting) and quick.py (the CPU demo)."""
