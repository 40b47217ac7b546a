"""lmpipe: a reproducible pipeline that trains language models from scratch.

Layers, top to bottom (an import points down only; tests/test_structure.py checks it):

    stages  collect  clean  tokenize  train  evaluate     python -m pipeline.<stage>, run by dvc.yaml
    tools   generate  export  compare  params            commands beside the stages
    ----------------------------------------------------------------------------------------------
    evaluation   scoring, translation, generation, tasks, qa, report
    decoding     decode (greedy, sampling, beam search), answer
    training     optim, dataloader, distributed, hardware, checkpoint, curves, loop
    model        model (the GPT and the recurrent baselines), config, weights
    data         sources/, rules, dedup, shards, qa (the default QA set), tokenizer
    core         common (errors, atomic I/O), params (the schema), paths, languages
"""
