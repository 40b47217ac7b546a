"""The networks (model: a GPT and recurrent baselines) and their weights on disk (weights); their
config, params.yaml's model group, is pipeline.core.params.ModelConfig."""
