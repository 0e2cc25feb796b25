"""Images in: reading files into tensors, giving a model the channels it takes, and fitting
them to its input size.
"""
