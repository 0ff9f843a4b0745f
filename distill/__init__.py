"""Guided distillation: the objectives of every stage and the trainings that chain them."""
