"""Triton kernels per weight format, with plain-torch references and LinearMethods.

Importing works without a GPU (and without triton: the methods then refuse politely)."""
