"""fedlora: federated LoRA fine-tuning on Flower; the library behind the apps."""
