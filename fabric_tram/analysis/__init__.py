"""Analysis: result tables and plots (ε-sharpness and CKA arrive with their issues)."""
