"""The networks (model: a GPT and recurrent baselines), their config (config), and their weights on
disk (weights)."""
