"""MRG Studio core library: study loading, models, explanation, storage, training, evaluation."""
__version__ = "0.1.0"
