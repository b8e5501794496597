"""Pipelines: a graph of dlgraph runs (train, evaluate, predict, export, sweep, sample)
passing artifacts, checked before anything runs, skipped when up to date, drawn.

- spec.py: the pipeline file's models, read with the line of every key.
- plan.py: the checked plan: specs loaded, artifacts resolved, the stage graph ordered.
- edges.py: the graphs on both sides of an edge held against each other.
- state.py: the pipeline directory, its manifest, the stage keys (content hashes).
- stages.py: each kind of stage run through the functions its command uses.
- execute.py: the scheduler (in this process, local processes, or Ray).
- draw.py: the stage graph as DOT, coloured by state.
"""
