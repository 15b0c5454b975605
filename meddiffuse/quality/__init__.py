"""Quality of synthetic data: fidelity (FD, KID, PRDC, C2ST), diversity (MS-SSIM), memorization audit.

``run_audit(synthetic, real)`` ties them together; ``record_audit`` saves it beside the dataset, logs it
to MLflow and tags the generator version; ``audit_html`` renders it for the report.
"""

from meddiffuse.quality.audit import IncompatibleDatasets, run_audit
from meddiffuse.quality.diversity import ms_ssim, ms_ssim_diversity
from meddiffuse.quality.features import (
    FeatureExtractor,
    classifier_extractor,
    default_extractors,
    downsampled_pixels,
    extract_features,
)
from meddiffuse.quality.fidelity import c2st, frechet_distance, kernel_inception_distance, prdc
from meddiffuse.quality.html import audit_html
from meddiffuse.quality.memorization import MemorizationResult, memorization
from meddiffuse.quality.persist import StaleAudit, audit_prefix, load_audit, save_audit
from meddiffuse.quality.result import AuditResult
from meddiffuse.quality.tracking import log_audit, record_audit, tag_generator_versions

__all__ = [
    "AuditResult",
    "FeatureExtractor",
    "IncompatibleDatasets",
    "MemorizationResult",
    "StaleAudit",
    "audit_html",
    "audit_prefix",
    "c2st",
    "classifier_extractor",
    "default_extractors",
    "downsampled_pixels",
    "extract_features",
    "frechet_distance",
    "kernel_inception_distance",
    "load_audit",
    "log_audit",
    "memorization",
    "ms_ssim",
    "ms_ssim_diversity",
    "prdc",
    "record_audit",
    "run_audit",
    "save_audit",
    "tag_generator_versions",
]
