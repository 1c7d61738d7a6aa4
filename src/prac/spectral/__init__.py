"""Fisher spectral analysis: per-block eigenvalues of F = (1/N) Σᵢ gᵢgᵢᵀ from per-sample gradients.

    from prac.spectral import FisherSpectral, SpectralConfig
    result = FisherSpectral(SpectralConfig()).compute_fisher_spectrum(model, input_ids, block_structure="layer_type")
    result["layer_0.mlp"].eigenvalues, result.whole_model.trace, result.to_dict()

See ``docs/spectral.md`` for the mathematics, the options and what is exact.
"""

from prac.spectral.config import SpectralConfig
from prac.spectral.fisher import FisherSpectral
from prac.spectral.result import BlockSpectrum, SpectralResult

__all__ = ["SpectralConfig", "FisherSpectral", "SpectralResult", "BlockSpectrum"]
