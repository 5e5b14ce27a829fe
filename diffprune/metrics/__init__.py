"""Measuring sample quality without a network (quality: Frechet distance, SSIM, PSNR), the shipped
Fashion-MNIST feature network (classifier: FD-FMNIST, class accuracy) and user-supplied networks (external:
Inception FID, CLIP score)."""
from .classifier import accuracy, fd_fmnist, features, load_classifier, predict, reference_statistics
from .external import clip_score, inception_fid, load_clip, load_feature_network, network_features
from .quality import feature_statistics, frechet_distance, psnr, ssim

__all__ = ["accuracy", "clip_score", "fd_fmnist", "feature_statistics", "features", "frechet_distance",
           "inception_fid", "load_classifier", "load_clip", "load_feature_network", "network_features", "predict",
           "psnr", "reference_statistics", "ssim"]
