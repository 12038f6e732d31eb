"""ray_fedat: federated adversarial training on a Ray cluster."""

__version__ = "0.1.0"
