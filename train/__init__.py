"""A Flax NNX LLaMA pretraining stack for the subspax optimizers.

Run `python -m train --config configs/<preset>.py`; see `train/__main__.py`.
"""
