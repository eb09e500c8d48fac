"""The encoder (a torchvision ResNet) and the projection head."""
