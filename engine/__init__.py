"""The engine: spec loading, graph building, shapes, autodiff, lowering, training."""
