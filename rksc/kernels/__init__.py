"""CPU kernels below the models: what the machine runs fast (`machine`), rksc's compiled kernels
(`build`, `gemm`) and their probes. Torch-only layers (models, engine) choose from what is here."""
