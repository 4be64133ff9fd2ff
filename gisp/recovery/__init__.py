"""Recovery of pruned levels: LoRA or full fine-tuning with cross-entropy, distillation from the dense model, and
one nested training that recovers every level of a trajectory at once (`python -m gisp.recover`, or `recover=...`
in gisp.run)."""
