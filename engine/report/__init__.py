"""What is shown to people: summaries, drawings, curves, evaluation, predictions."""
