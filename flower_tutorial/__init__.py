"""flower_tutorial: Flower's 'Get started' tutorial (PyTorch, CIFAR-10) as an app."""
