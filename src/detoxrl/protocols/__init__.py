"""Frozen evaluation protocols shipped with detoxrl (detoxrl.evaluation.protocol)."""
