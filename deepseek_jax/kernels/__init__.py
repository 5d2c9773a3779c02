"""Fast paths per platform beside the model's plain ones: attention (`attention.py`), the
absorbed-MLA decode over the latent cache (`decode.py`) and the grouped expert matmul
(`gmm.py`), chosen by `select.by_platform` from ModelConfig.kernels and the lowering platform."""
