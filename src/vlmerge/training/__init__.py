"""Pre-training and fine-tuning: objectives over (outputs, batch) and an explicit trainer."""
