"""fogline: one LLM split between a small device (llama.cpp) and a server (PyTorch).

This package is the torch-free shared core: bundle manifests, the wire protocol
and the command line. Both runtimes import it; it imports neither torch nor
llama_cpp, so the edge can carry it.
"""

__version__ = "0.1.0"
