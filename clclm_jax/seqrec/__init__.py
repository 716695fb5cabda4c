"""Sequential recommendation as text: catalogue retrieval (BM25, dense), full-catalogue ranking metrics,
popularity and BM25 baselines over `clclm_jax.data.nextitem` datasets."""
