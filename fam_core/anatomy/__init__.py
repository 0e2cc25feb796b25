"""Model anatomy: the target layer, its feature layout, the pooling and the head after it,
and the output a model explains.

What may import what: see docs/architecture.md.
"""
