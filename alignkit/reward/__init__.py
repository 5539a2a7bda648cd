"""The critique-based reward model (MM-RLHF): critique generation plus a scalar score head.

`model` (the model), `losses`, `train` (fitting), `score` (scoring samples and pairs); import the
module you need: importing this package stays light, since the CLI reads the stage list."""
