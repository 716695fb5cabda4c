"""Text data for recommendation alignment: records, TALLRec prompts, tokenization and grain pipelines."""
