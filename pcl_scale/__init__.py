"""pcl-scale: Prototypical Contrastive Learning (Li et al., ICLR 2021) at scale."""

__version__ = "0.1.0"
