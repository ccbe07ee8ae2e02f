"""Class-Balanced Self-Training (CBST) for domain adaptation of semantic segmentation."""

__version__ = "0.1.0"
