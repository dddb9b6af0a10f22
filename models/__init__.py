"""Models built on the fused ragged ops (installed as `resnas_kernels.models`): the ViT-ResNAS supernet and its
sub-networks, and LeViT. Importing registers them with timm under names of our own."""
