"""bdscan: find, show and remove neural backdoors in image classifiers.

Pixel- and patch-level Neural Cleanse (Wang et al., S&P 2019; Raj et al., "We must protect the
Transformers") behind a CI-friendly command line.
"""

__version__ = "0.1.0"
