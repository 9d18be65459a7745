"""Segmentation networks in plain torch; backbone keys match torchvision's ResNets."""
