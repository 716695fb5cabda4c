"""CLCLMRec contrastive core: sequence encoder, InfoNCE / next-item losses, ranking metrics, pretraining."""
