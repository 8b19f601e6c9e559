"""Velo: develop one service of a Kubernetes application locally, with the rest in the cluster."""

__version__ = "0.1.0"
