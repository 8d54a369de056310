"""The scenario zoo: real-model failures and planted-fault models with ground truth.

Every failing case is labelled by running the model, never by hand.

Example::

    from analysis.scenarios import planted
    pm = planted.build_planted_gpt2(seed=0, layer=1, neuron=5, trigger_token=7, target_token=9)
"""
