"""pcl-scale."""
