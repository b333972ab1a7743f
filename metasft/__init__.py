"""metasft: meta-learning supervised fine-tuning (MAML, FOMAML, Reptile, META-LoRA) for causal LMs."""

__version__ = "0.1.0"
