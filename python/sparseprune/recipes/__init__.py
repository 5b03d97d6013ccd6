"""End-to-end recipes: prune a real model with :func:`sparseprune.distill`, evaluate, convert, time.

``python -m sparseprune.recipes.minilm --help``: all-MiniLM-L6-v2 on Wikipedia summaries.
``python -m sparseprune.recipes.digits --help``: a small CNN on scikit-learn's digits.
"""
