"""Analyses beyond the scan's verdict (research paper, section 5): what triggers do inside a model."""

from bdscan.analysis.activations import (
    ActivationProfile,
    ActivationStats,
    LayerStats,
    NeuronIncrease,
    PrecisionAtK,
    activation_profile,
    activation_stats,
    activations_section,
    hooked_layers,
    neuron_ranking,
    precision_at_k,
)

__all__ = [
    "ActivationProfile",
    "ActivationStats",
    "LayerStats",
    "NeuronIncrease",
    "PrecisionAtK",
    "activation_profile",
    "activation_stats",
    "activations_section",
    "hooked_layers",
    "neuron_ranking",
    "precision_at_k",
]
