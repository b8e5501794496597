"""The suite never touches the user's program cache: it keeps its own, fresh for each run."""

import os
import tempfile

os.environ["DLGRAPH_CACHE_DIR"] = tempfile.mkdtemp(prefix="dlgraph-test-cache-")
