"""Training stages: SFT, DPO and MM-DPO (on TRL), PPO. Import the module you need (e.g.
`alignkit.train.dpo`): importing this package stays light, since the CLI reads the stage list."""
