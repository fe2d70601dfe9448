"""Multitask BERT (SST-5, Quora, STS) and a distributed search over its design space."""

__version__ = "0.1.0"
