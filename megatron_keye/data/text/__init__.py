"""Text side: tokenizer, chat template and loss masks, vision placeholder tokens, synthetic text."""
