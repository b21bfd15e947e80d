"""Evaluation of a detoxified policy against its reference model: statistics, report and run comparison."""
