"""The suite never touches the user's program cache: it keeps its own, fresh for each run."""

import os
import tempfile

os.environ["DLGRAPH_CACHE_DIR"] = tempfile.mkdtemp(prefix="dlgraph-test-cache-")
# nor its record of the files dlgraph wrote (engine/io/outputs.py)
os.environ["DLGRAPH_STATE_DIR"] = tempfile.mkdtemp(prefix="dlgraph-test-state-")
