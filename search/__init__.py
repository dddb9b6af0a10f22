"""Supernet training with multi-architectural sampling and evolutionary search (installed as
`resnas_kernels.search`)."""
