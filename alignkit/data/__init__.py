"""Data in and out of the stages: dataset adapters (`preference`: a pairs file as the `Dataset` TRL
trains on) and synthetic worlds (`worlds.shapes`). Importing this package imports nothing heavy."""
