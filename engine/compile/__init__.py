"""Graph -> tinygrad program: device choice, the interpreter, the staged program, caches."""
