"""Models: resolving a name, loading model and processor, LoRA, merging; and their inputs."""
