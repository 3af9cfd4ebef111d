"""Plain-PyTorch training: pre-training epochs, fine-tuning, evaluation. No Ray here."""
